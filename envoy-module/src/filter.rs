//! What the module does with one request, in safe Rust: read the request headers, let
//! keygate's decider answer (`keygate::api::envoy_module`), and carry its answer out
//! through the `Stream` a hook is given. `ffi` implements `Stream` on Envoy's callbacks;
//! the tests implement it on plain values.
//!
//! A panic inside the decision is caught here: the request goes on to ext_authz as if
//! the module had not been there, and Envoy keeps serving.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
#[cfg(feature = "bench-floor")]
use std::sync::OnceLock;

use keygate::api::envoy_module::{Local, LocalAllow, ModuleDecider, Ticket, LEARN_HEADER};
use keygate::config::ConfigError;
use keygate::server::module::ModuleRuntime;

/// ext_authz's dynamic metadata namespace: where keygate's answer puts the principal,
/// and where the module puts it when it answers itself.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";
/// The module's own namespace: `decided: true` when it answered, which the ext_authz
/// filter's `filter_enabled_metadata` (inverted) reads to skip the request.
pub const MODULE_NAMESPACE: &str = "keygate.module";
pub const DECIDED_KEY: &str = "decided";
/// Environment variable naming a request header that makes the decision panic: for the
/// test that proves a panic never crosses into Envoy. Unset, nothing panics.
pub const PANIC_HEADER_ENV: &str = "KEYGATE_MODULE_TEST_PANIC_HEADER";

/// Envoy's side of one stream, as the module uses it.
pub trait Stream {
    /// `f` over the request headers (pseudo-headers included, repeated ones as separate
    /// entries), read in place: valid for the call only.
    fn with_request_headers<R>(&self, f: impl FnOnce(&[(&[u8], &[u8])]) -> R) -> R;
    fn set_request_header(&self, name: &str, value: &str);
    fn remove_request_header(&self, name: &str);
    fn set_response_header(&self, name: &str, value: &str);
    /// Ends the stream with a local reply.
    fn send_response(&self, status: u16, headers: &[(String, String)], body: &str);
    /// Sets these string fields of `namespace`, at once.
    fn set_metadata_strings<'a>(
        &self,
        namespace: &str,
        fields: impl Iterator<Item = (&'a str, &'a str)>,
    );
    fn set_metadata_bool(&self, namespace: &str, key: &str, value: bool);
    fn add_metadata_list_string(&self, namespace: &str, key: &str, value: &str);
    fn metadata_string(&self, namespace: &str, key: &str) -> Option<String>;
    fn log(&self, message: &str);
    /// Adds one to the counter Envoy gave `id`, at `label`'s value if it has a label.
    fn increment(&self, id: usize, label: Option<&str>);
}

/// What the module counts in Envoy's stats, under the filter's metrics namespace (its
/// `dynamic_module_config.metrics_namespace`): Envoy's own counters then tell how much
/// the module answers, and why the rest went to keygate. Only a denial and an answer
/// not learned have a label: a labelled increment looks its tags up in Envoy's symbol
/// table, which an allow (the module's reason to be) and a hand-over (measured against
/// ext_authz alone) should not pay for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Requests the module allowed.
    Allowed,
    /// Requests the module denied, by the public error code shown (label `code`).
    Denied,
    /// Handed to ext_authz: a credential the module holds no answer for (new, wrong, a
    /// JWT, a partner's tenant not seen yet); keygate answers, and an allow is learned.
    UnknownCredential,
    /// Handed to ext_authz: a credential whose requests need what only keygate has (a
    /// rate-limited plan, a concurrency lease, a session mint).
    ServiceOnly,
    /// Handed to ext_authz: the module is not following keygate's revocation stream, so
    /// it decides nothing.
    NotFollowing,
    /// Handed to ext_authz: a request the module does not read (headers that must reach
    /// keygate as Envoy sends them).
    Unread,
    /// Handed to ext_authz: the decision panicked.
    Panicked,
    /// keygate allowed a request handed over to be learned, and the module did not keep
    /// the answer, by why (label `reason`: `NotLearned::reason`). Counted on the
    /// response, beside the hand-over's own counter.
    NotLearned,
}

impl Counter {
    pub const ALL: [Counter; 8] = [
        Counter::Allowed,
        Counter::Denied,
        Counter::UnknownCredential,
        Counter::ServiceOnly,
        Counter::NotFollowing,
        Counter::Unread,
        Counter::Panicked,
        Counter::NotLearned,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Allowed => "keygate_module_allowed",
            Counter::Denied => "keygate_module_denied",
            Counter::UnknownCredential => "keygate_module_handed_over_unknown_credential",
            Counter::ServiceOnly => "keygate_module_handed_over_service_only",
            Counter::NotFollowing => "keygate_module_handed_over_not_following",
            Counter::Unread => "keygate_module_handed_over_unread",
            Counter::Panicked => "keygate_module_handed_over_panic",
            Counter::NotLearned => "keygate_module_not_learned",
        }
    }

    /// Its label's name, if it has one.
    pub fn label(self) -> Option<&'static str> {
        match self {
            Counter::Denied => Some("code"),
            Counter::NotLearned => Some("reason"),
            _ => None,
        }
    }
}

/// The ids Envoy gave the counters (indexed by `Counter as usize`, which is each one's
/// place in `Counter::ALL`); `None` for one it refused (the module then does not count it).
pub type CounterIds = [Option<usize>; Counter::ALL.len()];

// `Counter::ALL.map(…)` builds a `CounterIds`, read back by `counter as usize`: the two
// orders must be one.
const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(
            Counter::ALL[i] as usize == i,
            "Counter::ALL is in declaration order"
        );
        i += 1;
    }
};

/// What a hook tells Envoy to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// A local reply was sent: the request goes no further.
    Stop,
}

/// What a module built with the `bench-floor` feature does on a listener whose
/// configuration starts with `floor:<mode>;`, instead of carrying out its decision: the
/// parts of the module's cost, measured by `scripts/bench envoy-module --floor` against
/// the whole. Not in a module built without the feature.
#[cfg(feature = "bench-floor")]
#[derive(Debug, Clone)]
pub enum Floor {
    /// Every request is marked decided (ext_authz skipped) and nothing else: Envoy's
    /// module machinery and the skipped ext_authz filter. Lets every request pass.
    Mark,
    /// The request is read and decided as the module decides it; an allow is marked
    /// decided, without its headers or metadata; the rest goes on as the module would
    /// send it (to ext_authz, learning from the answer). The machinery and keygate's
    /// decision, without carrying out the allow.
    Decide,
    /// Once the module has given one allow (as it does: deciding, or handing over and
    /// learning), every later request is marked decided and has that allow's headers
    /// and metadata written, without being read or decided: the machinery and carrying
    /// out an allow, with a decision that costs nothing. Lets every later request pass.
    Write(Arc<OnceLock<LocalAllow>>),
}

#[cfg(feature = "bench-floor")]
impl Floor {
    /// The floor a configuration asks for, and the configuration after it.
    fn split(config: &str) -> (Option<Floor>, &str) {
        for (prefix, floor) in [
            ("floor:mark;", Floor::Mark),
            ("floor:decide;", Floor::Decide),
            ("floor:write;", Floor::Write(Arc::default())),
        ] {
            if let Some(rest) = config.strip_prefix(prefix) {
                return (Some(floor), rest);
            }
        }
        (None, config)
    }
}

/// One filter configuration: keygate's decider and its follower thread.
pub struct FilterConfig {
    runtime: ModuleRuntime,
    panic_header: Option<String>,
    counters: CounterIds,
    #[cfg(feature = "bench-floor")]
    floor: Option<Floor>,
}

impl FilterConfig {
    /// `config` is the filter's `filter_config` (a `StringValue`): keygate's
    /// configuration itself (YAML), or `file:` and the path of keygate's configuration
    /// file, followed for changes (`ModuleRuntime::start`). `env` is Envoy's environment
    /// (`KEYGATE_…` overrides and secrets).
    pub fn new(
        config: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<FilterConfig, ConfigError> {
        #[cfg(feature = "bench-floor")]
        let (floor, config) = Floor::split(config);
        let env: Vec<(String, String)> = env.into_iter().collect();
        let panic_header = env
            .iter()
            .find(|(k, _)| k == PANIC_HEADER_ENV)
            .map(|(_, v)| v.to_ascii_lowercase());
        Ok(FilterConfig {
            runtime: ModuleRuntime::start(config, env)?,
            panic_header,
            counters: [None; Counter::ALL.len()],
            #[cfg(feature = "bench-floor")]
            floor,
        })
    }

    /// The counters Envoy defined for this configuration.
    pub fn set_counters(&mut self, ids: CounterIds) {
        self.counters = ids;
    }

    pub fn decider(&self) -> &Arc<ModuleDecider> {
        &self.runtime.decider
    }

    pub fn filter(&self) -> Filter {
        Filter {
            decider: Arc::clone(&self.runtime.decider),
            panic_header: self.panic_header.clone(),
            counters: self.counters,
            ticket: None,
            allowed: None,
            #[cfg(feature = "bench-floor")]
            floor: self.floor.clone(),
        }
    }
}

/// One stream.
pub struct Filter {
    decider: Arc<ModuleDecider>,
    panic_header: Option<String>,
    counters: CounterIds,
    /// Handed to ext_authz: what the answer is judged against when it comes back.
    ticket: Option<Ticket>,
    /// The allow the module gave, whose client headers go on the response.
    allowed: Option<LocalAllow>,
    #[cfg(feature = "bench-floor")]
    floor: Option<Floor>,
}

impl Filter {
    pub fn on_request_headers(&mut self, stream: &impl Stream) -> Next {
        #[cfg(feature = "bench-floor")]
        if let Some(floor) = &self.floor {
            if self.floor(stream, floor) {
                return Next::Continue;
            }
        }
        let decided = stream.with_request_headers(|headers| {
            catch_unwind(AssertUnwindSafe(|| {
                if let Some(trigger) = &self.panic_header {
                    if headers
                        .iter()
                        .any(|(k, _)| k.eq_ignore_ascii_case(trigger.as_bytes()))
                    {
                        panic!("the test trigger {trigger} asked the decision to panic");
                    }
                }
                self.decider.answer(headers)
            }))
        });
        match decided {
            Ok(Some(Local::Allow(allow))) => {
                self.count(stream, Counter::Allowed, None);
                write_allow(stream, &allow);
                self.allowed = Some(allow);
                Next::Continue
            }
            Ok(Some(Local::Deny(deny))) => {
                self.count(stream, Counter::Denied, Some(&deny.code));
                stream.send_response(deny.status, &deny.headers, &deny.body);
                Next::Stop
            }
            Ok(Some(Local::Defer(ticket))) => {
                self.count(stream, Counter::UnknownCredential, None);
                stream.set_request_header(LEARN_HEADER, "1");
                self.ticket = Some(ticket);
                Next::Continue
            }
            Ok(Some(Local::HandOver)) => {
                self.count(stream, Counter::ServiceOnly, None);
                Next::Continue
            }
            Ok(Some(Local::NotFollowing)) => {
                self.count(stream, Counter::NotFollowing, None);
                Next::Continue
            }
            // Headers the service must read as Envoy sends them.
            Ok(None) => {
                self.count(stream, Counter::Unread, None);
                Next::Continue
            }
            Err(_) => {
                self.count(stream, Counter::Panicked, None);
                stream.log("keygate module: the decision panicked; the request goes to ext_authz");
                Next::Continue
            }
        }
    }

    fn count(&self, stream: &impl Stream, counter: Counter, label: Option<&str>) {
        if let Some(id) = self.counters[counter as usize] {
            stream.increment(id, label);
        }
    }

    /// Whether the floor marked the request decided; if not, the module goes on as it
    /// does (hands it over, learns from the answer).
    #[cfg(feature = "bench-floor")]
    fn floor(&self, stream: &impl Stream, floor: &Floor) -> bool {
        let allowed = match floor {
            Floor::Mark => true,
            Floor::Decide => stream.with_request_headers(|headers| {
                matches!(self.decider.answer(headers), Some(Local::Allow(_)))
            }),
            Floor::Write(first) => {
                let allow = match first.get() {
                    Some(allow) => allow,
                    None => match stream.with_request_headers(|h| self.decider.answer(h)) {
                        Some(Local::Allow(allow)) => first.get_or_init(|| allow),
                        _ => return false,
                    },
                };
                // `write_allow` marks it decided.
                write_allow(stream, allow);
                return true;
            }
        };
        if allowed {
            stream.set_metadata_bool(MODULE_NAMESPACE, DECIDED_KEY, true);
        }
        allowed
    }

    pub fn on_response_headers(&mut self, stream: &impl Stream) -> Next {
        for (name, value) in self.allowed.iter().flat_map(LocalAllow::response_headers) {
            stream.set_response_header(name, value);
        }
        if let Some(ticket) = self.ticket.take() {
            if let Some(text) = stream.metadata_string(EXT_AUTHZ_NAMESPACE, "learn") {
                match catch_unwind(AssertUnwindSafe(|| self.decider.learn(&ticket, &text))) {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => self.count(stream, Counter::NotLearned, Some(why.reason())),
                    Err(_) => stream
                        .log("keygate module: learning an answer panicked; nothing was learned"),
                }
            }
        }
        Next::Continue
    }
}

/// An allow, as Envoy carries out keygate's ext_authz allow: removals first, then the
/// identity headers, then the same dynamic metadata; and ext_authz skipped. (Its client
/// headers go on the response, later.)
fn write_allow(stream: &impl Stream, allow: &LocalAllow) {
    for name in allow.remove() {
        stream.remove_request_header(name);
    }
    for (name, value) in allow.headers() {
        stream.set_request_header(name, value);
    }
    if let Some((fields, scopes)) = allow.metadata() {
        stream.set_metadata_strings(EXT_AUTHZ_NAMESPACE, fields);
        for scope in scopes {
            stream.add_metadata_list_string(EXT_AUTHZ_NAMESPACE, "scopes", scope);
        }
    }
    stream.set_metadata_bool(MODULE_NAMESPACE, DECIDED_KEY, true);
}
