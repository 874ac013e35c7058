//! What the upstream is told about a request (the forwarded head), and what the client is
//! told besides the upstream's answer (the `RateLimit-*` headers).

use std::cell::RefCell;
use std::net::IpAddr;

use actix_web::HttpRequest;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use hyper::header as upstream_header;
use observability::request_id::propagation_headers;
use sha2::{Digest, Sha256};

use super::Route;
use crate::client::RequestBody;
use crate::ratelimit::Decision;
use crate::upstream::endpoints::Endpoint;

/// Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1), plus those the
/// gateway sets itself and the caller's credentials.
const NOT_FORWARDED: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
    "x-request-id",
];

const X_FORWARDED_FOR: upstream_header::HeaderName = upstream_header::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: upstream_header::HeaderName = upstream_header::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: upstream_header::HeaderName = upstream_header::HeaderName::from_static("x-forwarded-host");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Idempotency keys are the client's own namespace: two clients choosing the same key must
/// not see each other's responses, so the key id goes in front (hashed when the result would
/// pass the upstream's length limit). The key itself was checked at admission.
fn scoped_idempotency_key(key_id: &str, key: &[u8]) -> Option<upstream_header::HeaderValue> {
    let scoped = format!("{key_id}:{}", String::from_utf8_lossy(key));
    let scoped = if scoped.len() <= idempotency_key::MAX_LENGTH {
        scoped
    } else {
        format!("{key_id}:sha256:{:x}", Sha256::digest(key))
    };
    upstream_header::HeaderValue::from_str(&scoped).ok()
}

pub fn forwardable(name: &str, connection: &[String]) -> bool {
    !NOT_FORWARDED.contains(&name) && !connection.iter().any(|listed| listed == name)
}

/// Header names listed in `Connection` are hop-by-hop too.
pub fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The `RateLimit-*` headers every response carries. The limit (a key's burst) and the
/// reset (seconds until its bucket is full) mostly repeat from one response to the next, so
/// each worker reuses their last values: formatting a header value allocates.
pub fn rate_limit_header_values(decision: &Decision) -> [(HeaderName, HeaderValue); 3] {
    let number = |number: &u64| HeaderValue::from(*number);
    [
        (RATELIMIT_LIMIT, LAST_LIMIT.with_borrow_mut(|last| last.get(decision.limit.into(), number))),
        (RATELIMIT_REMAINING, HeaderValue::from(decision.remaining)),
        (RATELIMIT_RESET, LAST_RESET.with_borrow_mut(|last| last.get(decision.reset_secs, number))),
    ]
}

/// The header value last made from a key, reused while the key repeats.
struct LastFormatted<K, V>(Option<(K, V)>);

impl<K: PartialEq, V: Clone> LastFormatted<K, V> {
    const fn new() -> Self {
        Self(None)
    }

    fn get(&mut self, key: K, format: impl FnOnce(&K) -> V) -> V {
        match &self.0 {
            Some((last, value)) if *last == key => value.clone(),
            _ => {
                let value = format(&key);
                self.0 = Some((key, value.clone()));
                value
            }
        }
    }
}

thread_local! {
    static LAST_LIMIT: RefCell<LastFormatted<u64, HeaderValue>> = const { RefCell::new(LastFormatted::new()) };
    static LAST_RESET: RefCell<LastFormatted<u64, HeaderValue>> = const { RefCell::new(LastFormatted::new()) };
    /// The last client address written as a header value on this worker.
    static LAST_PEER: RefCell<LastFormatted<IpAddr, Option<upstream_header::HeaderValue>>> =
        const { RefCell::new(LastFormatted::new()) };
}

/// `peer` as a header value. Formatting an address costs more than the rest of the
/// forwarded head, and a gateway mostly hears from the same few peers (load balancers,
/// keep-alive clients), so each worker keeps the last one.
fn peer_address_value(peer: IpAddr) -> Option<upstream_header::HeaderValue> {
    LAST_PEER.with_borrow_mut(|last| last.get(peer, |ip| upstream_header::HeaderValue::from_str(&ip.to_string()).ok()))
}

/// What the upstream is told about the request, whichever endpoint it goes to.
pub struct ForwardedHead<'a> {
    method: hyper::Method,
    /// The route's upstream prefix, the path below the route's prefix, and the query: put
    /// together below the endpoint's base path.
    upstream_prefix: &'a str,
    rest: &'a str,
    query: &'a str,
    headers: upstream_header::HeaderMap,
}

impl<'a> ForwardedHead<'a> {
    /// `None` for a method hyper cannot send (one actix parsed is always one hyper parses).
    pub fn new(req: &'a HttpRequest, route: &'a Route, key_id: &str) -> Option<Self> {
        let rest = &req.path()[route.prefix.len()..];
        let method = hyper::Method::from_bytes(req.method().as_str().as_bytes()).ok()?;
        let connection = connection_tokens(req.headers().get_all(header::CONNECTION).map(HeaderValue::as_bytes));
        let mut headers = upstream_header::HeaderMap::with_capacity(req.headers().len() + 6);
        for (name, value) in req.headers() {
            let (name, value) = (name.as_str(), value.as_bytes());
            let value = if name == idempotency_key::HEADER {
                scoped_idempotency_key(key_id, value)
            } else if forwardable(name, &connection) {
                upstream_header::HeaderValue::from_bytes(value).ok()
            } else {
                continue;
            };
            // Names and values come from a parsed request: they are valid here too.
            if let (Ok(name), Some(value)) = (upstream_header::HeaderName::from_bytes(name.as_bytes()), value) {
                headers.append(name, value);
            }
        }
        for (name, value) in propagation_headers(req).iter() {
            if let Ok(value) = upstream_header::HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        let previous = req.headers().get(header::X_FORWARDED_FOR).and_then(|v| v.to_str().ok());
        let forwarded_for = match (previous, req.peer_addr()) {
            (Some(previous), Some(peer)) => {
                upstream_header::HeaderValue::from_str(&format!("{previous}, {}", peer.ip())).ok()
            }
            (None, Some(peer)) => peer_address_value(peer.ip()),
            (Some(previous), None) => upstream_header::HeaderValue::from_str(previous).ok(),
            (None, None) => None,
        };
        if let Some(value) = forwarded_for {
            headers.insert(X_FORWARDED_FOR, value);
        }
        headers.insert(X_FORWARDED_PROTO, upstream_header::HeaderValue::from_static("http"));
        let host = req
            .headers()
            .get(header::HOST)
            .map(HeaderValue::as_bytes)
            .or_else(|| Some(req.uri().authority()?.as_str().as_bytes()));
        if let Some(host) = host.and_then(|h| upstream_header::HeaderValue::from_bytes(h).ok()) {
            headers.insert(X_FORWARDED_HOST, host);
        }
        Some(Self { method, upstream_prefix: &route.upstream_prefix, rest, query: req.query_string(), headers })
    }

    /// The request for `endpoint`; `Err` names a URI that cannot be built (a bug).
    pub fn into_request(self, endpoint: &Endpoint, body: RequestBody) -> Result<hyper::Request<RequestBody>, String> {
        let parts = [endpoint.url.path.as_str(), self.upstream_prefix, self.rest];
        let query_length = if self.query.is_empty() { 0 } else { 1 + self.query.len() };
        // Exactly sized: the URI then takes the buffer over without copying it.
        let mut uri = String::with_capacity(parts.iter().map(|part| part.len()).sum::<usize>() + query_length);
        parts.iter().for_each(|part| uri.push_str(part));
        if !self.query.is_empty() {
            uri.push('?');
            uri.push_str(self.query);
        }
        let mut request = hyper::Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = hyper::Uri::from_maybe_shared(uri.into_bytes()).map_err(|e| e.to_string())?;
        *request.headers_mut() = self.headers;
        request.headers_mut().insert(upstream_header::HOST, endpoint.url.host_header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_including_those_named_in_connection_are_not_forwarded() {
        let listed = connection_tokens([b"keep-alive, X-Custom-Hop".as_slice()].into_iter());
        assert!(!forwardable("x-custom-hop", &listed));
        for name in [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "authorization",
            "host",
        ] {
            assert!(!forwardable(name, &listed), "{name}");
        }
        assert!(forwardable("x-kept", &listed));
        assert!(forwardable("content-type", &listed));
    }

    #[test]
    fn idempotency_keys_are_scoped_to_the_client_and_stay_within_the_limit() {
        assert_eq!(scoped_idempotency_key("dev", b"order-1").unwrap(), "dev:order-1");
        let longest = "k".repeat(idempotency_key::MAX_LENGTH);
        let scoped = scoped_idempotency_key("dev", longest.as_bytes()).unwrap();
        assert!(scoped.to_str().unwrap().starts_with("dev:sha256:"));
        assert!(idempotency_key::parse(scoped.as_bytes()).is_ok(), "the data service accepts it");
    }
}
