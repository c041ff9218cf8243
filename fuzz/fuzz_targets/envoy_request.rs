//! Bytes as a CheckRequest from Envoy: keygate's reader never panics, and wherever
//! envoy-types decodes the bytes, keygate reads what envoy-types does
//! (`keygate_fuzz::envoy_oracle`, the claim `tests/envoy_wire_props.rs` tests too).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Err(difference) = keygate_fuzz::envoy_oracle::check_bytes(bytes) {
        panic!("{difference}");
    }
});
