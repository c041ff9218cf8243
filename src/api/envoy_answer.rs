//! keygate's answer to Envoy's `Check`, written to the wire straight from the decision.
//!
//! An allow carries four identity headers, the headers to remove and the principal as
//! dynamic metadata. Built with envoy-types, that is a `CheckResponse` of a dozen owned
//! strings, a `HashMap` and a list on every request, made only to be encoded and dropped.
//! `AllowAnswer` holds the principal (shared with the cache) and the per-request parts,
//! and writes the same protobuf from them: no copies, one buffer. Denials keep
//! envoy-types' messages (`CheckAnswer::Message`).
//!
//! The field numbers are those of Envoy's `external_auth.proto`, `base.proto` and
//! Google's `struct.proto`. The tests decode every shape of answer with envoy-types and
//! compare it with the same answer built from envoy-types' own messages.

use std::sync::Arc;

use bytes::{Buf, BufMut};
use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use prost::encoding::{
    encode_key, encode_varint, encoded_len_varint, key_len, skip_field, DecodeContext, WireType,
};
use prost::{DecodeError, Message};

use crate::principal::Principal;
use crate::secret::Secret;

/// What keygate answers a Check with.
#[derive(Debug, Clone)]
pub enum CheckAnswer {
    /// An allow, encoded from its parts.
    Allow(AllowAnswer),
    /// Any other answer, as envoy-types' message.
    Message(CheckResponse),
}

/// An allow: `status` OK, an `ok_response` with the identity headers and the headers to
/// remove, and the principal in `dynamic_metadata`.
#[derive(Debug, Clone)]
pub struct AllowAnswer {
    /// Who was authenticated, and for which tenant; `None` on a public route.
    pub identity: Option<Identity>,
    /// Request headers Envoy removes before forwarding.
    pub remove: Vec<String>,
    /// Headers Envoy adds to the response the client gets (the `x-ratelimit-*`); a minted
    /// session token (in `identity`) is added after them.
    pub response_headers: Vec<(&'static str, String)>,
}

/// The authenticated side of an allow.
#[derive(Debug, Clone)]
pub struct Identity {
    pub principal: Arc<Principal>,
    /// The tenant the request acts for (the principal's own, or a delegated one); `None`
    /// for a partner or runtime key acting as itself (no tenant header goes upstream).
    pub tenant: Option<String>,
    /// The name of the tenant header (configurable).
    pub tenant_header: Arc<str>,
    /// Whether the principal also goes into `dynamic_metadata`.
    pub metadata: bool,
    /// The concurrent-session lease the request took, if its route takes one.
    pub lease_id: Option<String>,
    /// The session token the request minted (`mint_session` routes): the token and its
    /// expiry (RFC 3339).
    pub session: Option<(Secret, String)>,
    /// What keygate's module inside Envoy learns from this allow, when it asked
    /// (`api::envoy_module`): one more metadata field, `learn`.
    pub learn: Option<String>,
}

/// Identity headers keygate sets upstream. Client-sent values are always overwritten.
pub const HEADER_SUBJECT: &str = "x-keygate-subject";
pub const HEADER_KEY_ID: &str = "x-keygate-key-id";
pub const HEADER_SCOPES: &str = "x-keygate-scopes";
/// `tenant`, `partner`, `runtime` or `jwt`.
pub const HEADER_KIND: &str = "x-keygate-kind";
pub const HEADER_ENVIRONMENT: &str = "x-keygate-environment";
/// The partner a partner key belongs to.
pub const HEADER_PARTNER: &str = "x-keygate-partner";
/// The lease a route with `lease_ttl` took: the upstream hands it back to release it.
pub const HEADER_LEASE: &str = "x-keygate-lease-id";
/// A session token minted on a `mint_session` route, and when it expires (RFC 3339):
/// sent upstream (to put in its own answer) and to the client.
pub const HEADER_SESSION_TOKEN: &str = "x-keygate-session-token";
pub const HEADER_SESSION_EXPIRES: &str = "x-keygate-session-expires-at";
/// The metadata field that carries what the module inside Envoy learns.
pub const METADATA_LEARN: &str = "learn";

/// Field numbers keygate writes, by message (`HeaderValue`'s are `envoy_wire`'s `KEY` and
/// `VALUE`).
mod field {
    /// `CheckResponse`
    pub const RESPONSE_STATUS: u32 = 1;
    pub const RESPONSE_OK: u32 = 3;
    pub const RESPONSE_METADATA: u32 = 4;
    /// `OkHttpResponse`
    pub const OK_HEADERS: u32 = 2;
    pub const OK_HEADERS_TO_REMOVE: u32 = 5;
    pub const OK_RESPONSE_HEADERS_TO_ADD: u32 = 6;
    /// `config.core.v3.HeaderValueOption`
    pub const OPTION_HEADER: u32 = 1;
    pub const OPTION_APPEND_ACTION: u32 = 3;
    pub use crate::api::envoy_wire::field::{KEY as HEADER_KEY, VALUE as HEADER_VALUE};
    /// `google.protobuf.Struct`, its map entries, `Value` and `ListValue`
    pub const STRUCT_FIELDS: u32 = 1;
    pub const ENTRY_KEY: u32 = 1;
    pub const ENTRY_VALUE: u32 = 2;
    pub const VALUE_STRING: u32 = 3;
    pub const VALUE_LIST: u32 = 6;
    pub const LIST_VALUES: u32 = 1;
}
use field::*;

/// The one rule for every header keygate sets, on allows and denials alike: it replaces
/// whatever the request or response had, never appends to it (a client must not be able
/// to add its own value beside keygate's).
const HEADER_ACTION: HeaderAppendAction = HeaderAppendAction::OverwriteIfExistsOrAdd;
const OVERWRITE: u64 = HEADER_ACTION as u64;

/// A header option with `HEADER_ACTION`, as envoy-types' message (denials, which are not
/// on the hot path, are built as messages).
pub(crate) fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HEADER_ACTION as i32,
        ..Default::default()
    }
}

impl Identity {
    /// The headers set upstream, in order: the tenant (if the request acts for one), the
    /// subject, the key id (API keys), the kind, the environment, the partner (partner
    /// keys), the scopes, the lease (routes that take one), the session token and its
    /// expiry (routes that mint one).
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let p = &self.principal;
        let session = self.session.as_ref();
        [
            self.tenant.as_deref().map(|t| (&*self.tenant_header, t)),
            Some((HEADER_SUBJECT, &*p.subject)),
            p.key_id.as_deref().map(|k| (HEADER_KEY_ID, k)),
            Some((HEADER_KIND, p.kind_label())),
            Some((HEADER_ENVIRONMENT, p.environment.as_str())),
            p.partner_id.as_deref().map(|k| (HEADER_PARTNER, k)),
            Some((HEADER_SCOPES, &*p.scopes_header)),
            self.lease_id.as_deref().map(|l| (HEADER_LEASE, l)),
            session.map(|(token, _)| (HEADER_SESSION_TOKEN, token.expose())),
            session.map(|(_, expires)| (HEADER_SESSION_EXPIRES, expires.as_str())),
        ]
        .into_iter()
        .flatten()
    }

    /// The string fields of the metadata (`scopes`, a list, is written apart).
    pub fn metadata(&self) -> impl Iterator<Item = (&str, &str)> {
        let p = &self.principal;
        [
            self.tenant.as_deref().map(|t| ("tenant_id", t)),
            Some(("subject", &*p.subject)),
            p.key_id.as_deref().map(|k| ("key_id", k)),
            Some(("kind", p.kind_label())),
            Some(("environment", p.environment.as_str())),
            p.partner_id.as_deref().map(|k| ("partner_id", k)),
            p.service.as_deref().map(|k| ("service", k)),
            p.issuer.as_deref().map(|i| ("issuer", i)),
            self.learn.as_deref().map(|l| (METADATA_LEARN, l)),
        ]
        .into_iter()
        .flatten()
    }

    /// The metadata's `scopes` list.
    pub fn scopes(&self) -> &[String] {
        &self.principal.scopes
    }
}

/// A length-delimited field of `len` bytes, whole.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// The key and length of a length-delimited field; its `len` bytes follow.
fn put_head(tag: u32, len: usize, buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(len as u64, buf);
}

fn put_str(tag: u32, s: &str, buf: &mut impl BufMut) {
    put_head(tag, s.len(), buf);
    buf.put_slice(s.as_bytes());
}

/// A proto3 `string` field: absent when empty.
fn plain_str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        delimited_len(tag, s.len())
    }
}

fn put_plain_str(tag: u32, s: &str, buf: &mut impl BufMut) {
    if !s.is_empty() {
        put_str(tag, s, buf);
    }
}

/// `HeaderValue { key, value }`.
fn header_value_len(key: &str, value: &str) -> usize {
    plain_str_len(HEADER_KEY, key) + plain_str_len(HEADER_VALUE, value)
}

/// `HeaderValueOption { header, append_action: OVERWRITE_IF_EXISTS_OR_ADD }`.
fn header_option_len(key: &str, value: &str) -> usize {
    delimited_len(OPTION_HEADER, header_value_len(key, value))
        + key_len(OPTION_APPEND_ACTION)
        + encoded_len_varint(OVERWRITE)
}

fn put_header_option(tag: u32, key: &str, value: &str, buf: &mut impl BufMut) {
    put_head(tag, header_option_len(key, value), buf);
    put_head(OPTION_HEADER, header_value_len(key, value), buf);
    put_plain_str(HEADER_KEY, key, buf);
    put_plain_str(HEADER_VALUE, value, buf);
    encode_key(OPTION_APPEND_ACTION, WireType::Varint, buf);
    encode_varint(OVERWRITE, buf);
}

/// `Value { string_value }`: a oneof member, present even when empty.
fn string_value_len(s: &str) -> usize {
    delimited_len(VALUE_STRING, s.len())
}

/// `ListValue { values: [Value { string_value }] }`.
fn list_len(items: &[String]) -> usize {
    items
        .iter()
        .map(|s| delimited_len(LIST_VALUES, string_value_len(s)))
        .sum()
}

/// A `Struct.fields` map entry `{ key, value }` whose value is `value_len` bytes.
fn entry_len(key: &str, value_len: usize) -> usize {
    plain_str_len(ENTRY_KEY, key) + delimited_len(ENTRY_VALUE, value_len)
}

fn put_entry_head(key: &str, value_len: usize, buf: &mut impl BufMut) {
    put_head(STRUCT_FIELDS, entry_len(key, value_len), buf);
    put_plain_str(ENTRY_KEY, key, buf);
    put_head(ENTRY_VALUE, value_len, buf);
}

impl AllowAnswer {
    /// What is added to the client's response: `response_headers`, then the session token
    /// and its expiry, if the request minted one.
    pub(crate) fn client_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        let session = self.identity.as_ref().and_then(|i| i.session.as_ref());
        self.response_headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(session.map(|(token, _)| (HEADER_SESSION_TOKEN, token.expose())))
            .chain(session.map(|(_, expires)| (HEADER_SESSION_EXPIRES, expires.as_str())))
    }

    fn ok_response_len(&self) -> usize {
        let headers: usize = self
            .identity
            .iter()
            .flat_map(Identity::headers)
            .map(|(k, v)| delimited_len(OK_HEADERS, header_option_len(k, v)))
            .sum();
        let remove: usize = self
            .remove
            .iter()
            .map(|h| delimited_len(OK_HEADERS_TO_REMOVE, h.len()))
            .sum();
        let response: usize = self
            .client_headers()
            .map(|(k, v)| delimited_len(OK_RESPONSE_HEADERS_TO_ADD, header_option_len(k, v)))
            .sum();
        headers + remove + response
    }

    fn metadata_len(identity: &Identity) -> usize {
        let strings: usize = identity
            .metadata()
            .map(|(k, v)| delimited_len(STRUCT_FIELDS, entry_len(k, string_value_len(v))))
            .sum();
        let scopes = delimited_len(VALUE_LIST, list_len(identity.scopes()));
        strings + delimited_len(STRUCT_FIELDS, entry_len("scopes", scopes))
    }

    fn put_metadata(identity: &Identity, buf: &mut impl BufMut) {
        put_head(RESPONSE_METADATA, Self::metadata_len(identity), buf);
        for (key, value) in identity.metadata() {
            put_entry_head(key, string_value_len(value), buf);
            put_str(VALUE_STRING, value, buf);
        }
        let list = list_len(identity.scopes());
        put_entry_head("scopes", delimited_len(VALUE_LIST, list), buf);
        put_head(VALUE_LIST, list, buf);
        for scope in identity.scopes() {
            put_head(LIST_VALUES, string_value_len(scope), buf);
            put_str(VALUE_STRING, scope, buf);
        }
    }
}

impl Message for CheckAnswer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        let a = match self {
            CheckAnswer::Message(m) => return m.encode_raw(buf),
            CheckAnswer::Allow(a) => a,
        };
        // status: OK, which is every field at its default.
        put_head(RESPONSE_STATUS, 0, buf);
        put_head(RESPONSE_OK, a.ok_response_len(), buf);
        for (key, value) in a.identity.iter().flat_map(Identity::headers) {
            put_header_option(OK_HEADERS, key, value, buf);
        }
        for name in &a.remove {
            put_str(OK_HEADERS_TO_REMOVE, name, buf);
        }
        for (key, value) in a.client_headers() {
            put_header_option(OK_RESPONSE_HEADERS_TO_ADD, key, value, buf);
        }
        if let Some(identity) = a.identity.as_ref().filter(|i| i.metadata) {
            AllowAnswer::put_metadata(identity, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        // keygate only sends answers; read one back as envoy-types' message.
        match self {
            CheckAnswer::Message(m) => m.merge_field(tag, wire_type, buf, ctx),
            CheckAnswer::Allow(_) => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            CheckAnswer::Message(m) => m.encoded_len(),
            CheckAnswer::Allow(a) => {
                delimited_len(RESPONSE_STATUS, 0)
                    + delimited_len(RESPONSE_OK, a.ok_response_len())
                    + a.identity.as_ref().filter(|i| i.metadata).map_or(0, |i| {
                        delimited_len(RESPONSE_METADATA, AllowAnswer::metadata_len(i))
                    })
            }
        }
    }

    fn clear(&mut self) {
        *self = CheckAnswer::default();
    }
}

impl Default for CheckAnswer {
    fn default() -> Self {
        CheckAnswer::Message(CheckResponse::default())
    }
}

impl From<CheckResponse> for CheckAnswer {
    fn from(m: CheckResponse) -> Self {
        CheckAnswer::Message(m)
    }
}

impl CheckAnswer {
    /// The answer as envoy-types reads it off the wire (tests, benchmarks).
    pub fn to_response(&self) -> Result<CheckResponse, DecodeError> {
        match self {
            CheckAnswer::Message(m) => Ok(m.clone()),
            CheckAnswer::Allow(_) => CheckResponse::decode(self.encode_to_vec().as_slice()),
        }
    }
}

#[cfg(test)]
mod tests;
