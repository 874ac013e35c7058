//! Request ids: taken from a sane incoming `X-Request-ID`, else a fresh UUID v7; available to
//! handlers through the [`RequestId`] extractor and propagated to outgoing requests.

use std::fmt;
use std::future::{Ready, ready};
use std::rc::Rc;

use actix_web::dev::Payload;
use actix_web::http::header::{HeaderMap, HeaderName};
use actix_web::{FromRequest, HttpMessage, HttpRequest};

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const TRACEPARENT_HEADER: &str = "traceparent";

// Looked up by name on every request: a `&str` key would be parsed (and, for these
// non-standard names, copied) on each lookup.
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const TRACEPARENT: HeaderName = HeaderName::from_static(TRACEPARENT_HEADER);

const MAX_LEN: usize = 128;

/// The id of the request being served. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(Rc<str>);

impl RequestId {
    /// The caller's id when it is 1..=128 characters of `[A-Za-z0-9._:-]`, otherwise a new
    /// UUID v7 (time-ordered, so ids sort roughly by arrival in log stores).
    pub fn from_incoming(headers: &HeaderMap) -> Self {
        headers
            .get(REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|value| is_valid(value))
            .map_or_else(Self::generate, |value| Self(Rc::from(value)))
    }

    pub fn generate() -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        Self(Rc::from(&*uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn is_valid(candidate: &str) -> bool {
    (1..=MAX_LEN).contains(&candidate.len())
        && candidate.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Extracts the id set by [`crate::Observe`]. Fails with a 500 when the middleware is not
/// installed, which is a wiring bug that tests must catch, not paper over.
impl FromRequest for RequestId {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<RequestId>()
                .cloned()
                .ok_or_else(|| actix_web::error::ErrorInternalServerError("request id middleware is not installed")),
        )
    }
}

/// The headers that carry a request's identity to the services it calls: its request id and,
/// when the caller sent a well-formed one, its W3C `traceparent`.
pub fn propagation_headers(req: &HttpRequest) -> PropagationHeaders<'_> {
    PropagationHeaders {
        request_id: req.extensions().get::<RequestId>().cloned(),
        traceparent: req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).filter(|v| is_valid_traceparent(v)),
    }
}

/// See [`propagation_headers`]; borrowed from the request, so nothing is copied.
pub struct PropagationHeaders<'a> {
    request_id: Option<RequestId>,
    traceparent: Option<&'a str>,
}

impl PropagationHeaders<'_> {
    /// `(header name, value)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let request_id = self.request_id.as_ref().map(|id| (REQUEST_ID_HEADER, id.as_str()));
        request_id.into_iter().chain(self.traceparent.map(|value| (TRACEPARENT_HEADER, value)))
    }
}

/// `version-traceid-parentid-flags`, lower-case hex, version `ff` and all-zero ids invalid
/// (W3C Trace Context, section 3.2).
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return false;
    };
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let non_zero = |s: &str| s.bytes().any(|b| b != b'0');
    hex(version, 2)
        && *version != "ff"
        && hex(trace_id, 32)
        && non_zero(trace_id)
        && hex(parent_id, 16)
        && non_zero(parent_id)
        && hex(flags, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_sane_ids() {
        assert!(is_valid("abc-123_x.y:z"));
        assert!(is_valid(&"a".repeat(128)));
        assert!(!is_valid(&"a".repeat(129)));
        assert!(!is_valid(""));
        assert!(!is_valid("has space"));
        assert!(!is_valid("new\nline"));
        assert!(!is_valid("ünïcode"));
    }

    #[test]
    fn generated_ids_are_uuid_v7() {
        let id = RequestId::generate();
        let parsed = uuid::Uuid::parse_str(id.as_str()).expect("uuid");
        assert_eq!(parsed.get_version_num(), 7);
    }

    #[test]
    fn traceparent_validation() {
        assert!(is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"));
        assert!(!is_valid_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"));
    }
}
