//! Envoy's dynamic-module ABI, as far as this module uses it: the hooks Envoy calls
//! (exported, `envoy_dynamic_module_on_…`) and the callbacks it offers
//! (`envoy_dynamic_module_callback_…`), declared here from the ABI's documented C
//! signatures (Envoy's `source/extensions/dynamic_modules/abi/abi.h`, ABI v0.2.0,
//! Envoy 1.40). The only `unsafe` code of the workspace.
//!
//! Every hook catches panics (unwinding into Envoy would abort it) and hands the work to
//! `filter`, which is safe Rust. Buffers Envoy passes are pointer + length, not
//! NUL-terminated, and valid only during the hook; they are copied before use.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::filter::{Counter, CounterIds, Filter, FilterConfig, Next, Stream};

/// Bytes Envoy owns, or bytes the module owns, as the ABI passes them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    ptr: *const c_char,
    length: usize,
}

/// A header (key and value), either side's; also a metadata field to set
/// (`envoy_dynamic_module_type_module_key_value_pair` has the same four fields).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Header {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`
const REQUEST_HEADER: i32 = 0;
const RESPONSE_HEADER: i32 = 2;
/// `envoy_dynamic_module_type_metadata_source_Dynamic`
const METADATA_DYNAMIC: i32 = 0;
/// `envoy_dynamic_module_type_log_level_Trace` … `_Error`
const LOG_TRACE: i32 = 0;
const LOG_DEBUG: i32 = 1;
const LOG_INFO: i32 = 2;
const LOG_WARN: i32 = 3;
const LOG_ERROR: i32 = 4;
/// `…_headers_status_Continue` / `_StopIteration` (the body and trailers statuses share
/// `Continue = 0`).
const CONTINUE: i32 = 0;
const STOP_ITERATION: i32 = 1;

impl Buffer {
    fn of(s: &str) -> Buffer {
        Buffer {
            ptr: s.as_ptr().cast(),
            length: s.len(),
        }
    }

    const EMPTY: Buffer = Buffer {
        ptr: std::ptr::null(),
        length: 0,
    };

    /// Envoy's bytes, in place. Envoy passes `length` readable bytes at `ptr`, valid
    /// until the hook that handed them over returns or a callback changes their map;
    /// callers use the slice only within that.
    fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            return &[];
        }
        // SAFETY: as above: `ptr` is non-null (checked) and points to `length` bytes
        // Envoy keeps unchanged for as long as the caller reads them.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.length) }
    }

    /// A copy of Envoy's bytes.
    fn to_vec(self) -> Vec<u8> {
        self.bytes().to_vec()
    }
}

impl Header {
    const EMPTY: Header = Header {
        key_ptr: std::ptr::null(),
        key_length: 0,
        value_ptr: std::ptr::null(),
        value_length: 0,
    };

    fn key(&self) -> Buffer {
        Buffer {
            ptr: self.key_ptr,
            length: self.key_length,
        }
    }

    fn value(&self) -> Buffer {
        Buffer {
            ptr: self.value_ptr,
            length: self.value_length,
        }
    }

    /// Views of the module's own strings, for a callback that copies them.
    fn all_of<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<Header> {
        pairs
            .map(|(k, v)| Header {
                key_ptr: k.as_ptr().cast(),
                key_length: k.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect()
    }
}

// SAFETY: these are the callbacks Envoy 1.40 exports to modules, declared with the
// parameter and return types of their documented C signatures (pointers as raw pointers,
// C enums as i32, `bool` as C's `_Bool`). Envoy resolves them when it loads the module.
unsafe extern "C" {
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: *mut c_void, kind: i32)
        -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        kind: i32,
        result: *mut Header,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        kind: i32,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status: u32,
        headers: *mut Header,
        headers_size: usize,
        body: Buffer,
        details: Buffer,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
        filter: *mut c_void,
        namespace: Buffer,
        entries: *const Header,
        entries_size: usize,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
        filter: *mut c_void,
        namespace: Buffer,
        key: Buffer,
        value: bool,
    );
    fn envoy_dynamic_module_callback_http_add_dynamic_metadata_list_string(
        filter: *mut c_void,
        namespace: Buffer,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: *mut c_void,
        source: i32,
        namespace: Buffer,
        key: Buffer,
        result: *mut Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_log(level: i32, message: Buffer);
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: Buffer,
        label_names: *const Buffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> i32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: *mut c_void,
        id: usize,
        label_values: *const Buffer,
        label_values_length: usize,
        value: u64,
    ) -> i32;
}

/// `envoy_dynamic_module_type_metrics_result_Success`
const METRICS_SUCCESS: i32 = 0;

/// Defines the module's counters on the filter configuration Envoy is creating
/// (`config_envoy`, as `config_new` was given it): their ids, or `None` for one Envoy
/// refused (logged; the module then does not count it).
fn define_counters(config_envoy: *mut c_void) -> CounterIds {
    Counter::ALL.map(|counter| {
        let labels: Option<Buffer> = counter.label().map(Buffer::of);
        let labels = labels.as_slice();
        let mut id = 0;
        // SAFETY: `config_envoy` is the configuration Envoy passed to `config_new`, which
        // is running now (counters can only be defined then); Envoy copies the name and
        // label names; `id` is a live `usize` it writes.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                config_envoy,
                Buffer::of(counter.name()),
                labels.as_ptr(),
                labels.len(),
                &mut id,
            )
        };
        if result != METRICS_SUCCESS {
            log(
                LOG_WARN,
                &format!(
                    "keygate module: Envoy refused the counter {} (result {result}); it is not counted",
                    counter.name()
                ),
            );
            return None;
        }
        Some(id)
    })
}

/// A line of keygate's own log (`crate::log`) at its level.
fn log_at(level: tracing::Level, message: &str) {
    let level = match level {
        tracing::Level::TRACE => LOG_TRACE,
        tracing::Level::DEBUG => LOG_DEBUG,
        tracing::Level::INFO => LOG_INFO,
        tracing::Level::WARN => LOG_WARN,
        tracing::Level::ERROR => LOG_ERROR,
    };
    log(level, message);
}

fn log(level: i32, message: &str) {
    // SAFETY: `message` is a live module-owned buffer that Envoy only reads during the
    // call; the level is one of the ABI's log levels.
    unsafe { envoy_dynamic_module_callback_log(level, Buffer::of(message)) }
}

/// One stream's side of Envoy: the `filter_envoy_ptr` Envoy passed to the hook running
/// now, valid until `on_http_filter_destroy`.
struct EnvoyStream(*mut c_void);

impl EnvoyStream {
    /// Replaces every value of `name` in the request's or the response's headers (`kind`).
    fn set_header(&self, kind: i32, name: &str, value: &str) {
        // SAFETY: a live stream, in a phase where that header map exists; Envoy copies
        // both buffers during the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                kind,
                Buffer::of(name),
                Buffer::of(value),
            );
        }
    }
}

impl Stream for EnvoyStream {
    fn with_request_headers<R>(&self, f: impl FnOnce(&[(&[u8], &[u8])]) -> R) -> R {
        // SAFETY: `self.0` is the live stream of the running hook.
        let size =
            unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.0, REQUEST_HEADER) };
        let mut headers = vec![Header::EMPTY; size];
        // SAFETY: `headers` has room for the `size` entries Envoy fills in.
        let filled = unsafe {
            envoy_dynamic_module_callback_http_get_headers(
                self.0,
                REQUEST_HEADER,
                headers.as_mut_ptr(),
            )
        };
        if !filled {
            return f(&[]);
        }
        let views: Vec<(&[u8], &[u8])> = headers
            .iter()
            .map(|h| (h.key().bytes(), h.value().bytes()))
            .collect();
        // Envoy's bytes are read in place, until `f` returns: before the hook returns
        // and before any callback could change the headers (`f` makes none).
        f(&views)
    }

    fn set_request_header(&self, name: &str, value: &str) {
        self.set_header(REQUEST_HEADER, name, value);
    }

    fn remove_request_header(&self, name: &str) {
        // SAFETY: a live stream; a null value removes the header (the ABI's documented
        // way: there is no remove callback).
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                REQUEST_HEADER,
                Buffer::of(name),
                Buffer::EMPTY,
            );
        }
    }

    fn set_response_header(&self, name: &str, value: &str) {
        self.set_header(RESPONSE_HEADER, name, value);
    }

    fn send_response(&self, status: u16, headers: &[(String, String)], body: &str) {
        let mut out = Header::all_of(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // SAFETY: a live stream; `out` points into `headers`' strings, which outlive the
        // call; Envoy copies headers and body before it returns.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(status),
                out.as_mut_ptr(),
                out.len(),
                Buffer::of(body),
                Buffer::of("keygate_module"),
            );
        }
    }

    fn set_metadata_strings<'a>(
        &self,
        namespace: &str,
        fields: impl Iterator<Item = (&'a str, &'a str)>,
    ) {
        let entries = Header::all_of(fields);
        // SAFETY: a live stream; `entries` points into the strings `fields` borrows, which
        // outlive the call; Envoy copies them all into one metadata update.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string_batch(
                self.0,
                Buffer::of(namespace),
                entries.as_ptr(),
                entries.len(),
            );
        }
    }

    fn set_metadata_bool(&self, namespace: &str, key: &str, value: bool) {
        // SAFETY: a live stream; Envoy copies both buffers.
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_bool(
                self.0,
                Buffer::of(namespace),
                Buffer::of(key),
                value,
            );
        }
    }

    fn add_metadata_list_string(&self, namespace: &str, key: &str, value: &str) {
        // SAFETY: a live stream; Envoy copies the three buffers.
        unsafe {
            envoy_dynamic_module_callback_http_add_dynamic_metadata_list_string(
                self.0,
                Buffer::of(namespace),
                Buffer::of(key),
                Buffer::of(value),
            );
        }
    }

    fn metadata_string(&self, namespace: &str, key: &str) -> Option<String> {
        let mut result = Buffer::EMPTY;
        // SAFETY: a live stream; Envoy writes a view of its own value into `result`,
        // valid until this hook returns; it is copied at once.
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_metadata_string(
                self.0,
                METADATA_DYNAMIC,
                Buffer::of(namespace),
                Buffer::of(key),
                &mut result,
            )
        };
        found
            .then(|| String::from_utf8(result.to_vec()).ok())
            .flatten()
    }

    fn log(&self, message: &str) {
        log(LOG_WARN, message);
    }

    fn increment(&self, id: usize, label: Option<&str>) {
        let labels: Option<Buffer> = label.map(Buffer::of);
        let labels = labels.as_slice();
        // SAFETY: a live stream; `id` is one Envoy gave this stream's configuration, with
        // as many labels as it was defined with; Envoy reads the label values during the
        // call.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.0,
                id,
                labels.as_ptr(),
                labels.len(),
                1,
            );
        }
    }
}

/// Runs `f`, turning a panic into `fallback`: no unwinding crosses into Envoy.
fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

fn next(n: Next) -> i32 {
    match n {
        Next::Continue => CONTINUE,
        Next::Stop => STOP_ITERATION,
    }
}

// The hooks. `#[no_mangle]` is what `unsafe_code` guards: each name must be exactly the
// ABI's, and nothing else in the process may define it.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    // A panic (caught at every hook) is one line in Envoy's log, and nothing more: Rust's
    // default hook would capture and print a backtrace on Envoy's worker thread, holding
    // it (and every stream on it, their timers included) for as long as that takes.
    // This module's Rust runtime is its own, so the hook is too.
    std::panic::set_hook(Box::new(|info| {
        log(LOG_ERROR, &format!("keygate module: panic: {info}"));
    }));
    guarded((), || crate::log::install(log_at));
    crate::ABI_VERSION.as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: *mut c_void,
    _name: Buffer,
    config: Buffer,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        let text = match String::from_utf8(config.to_vec()) {
            Ok(t) => t,
            Err(_) => {
                log(LOG_ERROR, "keygate module: filter_config is not UTF-8 text (give keygate's configuration as a StringValue)");
                return std::ptr::null();
            }
        };
        match FilterConfig::new(&text, std::env::vars()) {
            Ok(mut c) => {
                c.set_counters(define_counters(config_envoy));
                Box::into_raw(Box::new(c)).cast_const().cast()
            }
            Err(e) => {
                log(
                    LOG_ERROR,
                    &format!("keygate module: invalid configuration: {e}"),
                );
                std::ptr::null()
            }
        }
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guarded((), || {
        // SAFETY: `config` is the pointer `config_new` returned from `Box::into_raw`;
        // Envoy destroys each configuration once, after its last filter.
        drop(unsafe { Box::from_raw(config.cast_mut().cast::<FilterConfig>()) });
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    _filter_envoy: *mut c_void,
) -> *const c_void {
    guarded(std::ptr::null(), || {
        // SAFETY: `config` is a live configuration from `config_new`: Envoy destroys it
        // only after every filter made from it.
        let config = unsafe { &*config.cast::<FilterConfig>() };
        Box::into_raw(Box::new(config.filter())).cast_const().cast()
    })
}

/// The filter of a hook.
///
/// # Safety
/// `filter` must be a pointer `on_http_filter_new` returned and not yet destroyed; Envoy
/// calls one stream's hooks one at a time, on its worker.
unsafe fn filter_of<'a>(filter: *const c_void) -> &'a mut Filter {
    // SAFETY: as the caller promises.
    unsafe { &mut *filter.cast_mut().cast::<Filter>() }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> i32 {
    guarded(CONTINUE, || {
        // SAFETY: Envoy passes this stream's live filter.
        let filter = unsafe { filter_of(filter) };
        next(filter.on_request_headers(&EnvoyStream(filter_envoy)))
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: *mut c_void,
    filter: *const c_void,
    _end_of_stream: bool,
) -> i32 {
    guarded(CONTINUE, || {
        // SAFETY: Envoy passes this stream's live filter.
        let filter = unsafe { filter_of(filter) };
        next(filter.on_response_headers(&EnvoyStream(filter_envoy)))
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter: *const c_void) {
    guarded((), || {
        // SAFETY: the pointer `on_http_filter_new` returned from `Box::into_raw`; Envoy
        // destroys each filter once, after its last hook.
        drop(unsafe { Box::from_raw(filter.cast_mut().cast::<Filter>()) });
    })
}

// Hooks Envoy requires that this module has no use for: bodies and trailers pass, the
// stream's end, callouts, the scheduler and watermarks are nothing to it.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _end_of_stream: bool,
) -> i32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
) -> i32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _end_of_stream: bool,
) -> i32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
) -> i32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _callout_id: u64,
    _result: i32,
    _headers: *mut Header,
    _headers_size: usize,
    _body_chunks: *mut Buffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _stream_id: u64,
    _headers: *mut Header,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _stream_id: u64,
    _data: *const Buffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _stream_id: u64,
    _trailers: *mut Header,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _stream_id: u64,
    _reason: i32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy: *mut c_void,
    _filter: *const c_void,
) {
}
