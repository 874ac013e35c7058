//! The proxy: route, authenticate, rate-limit, forward with retries and a deadline, stream
//! both ways.
//!
//! Errors follow pingora's split: the client's fault (downstream: 401, 404, 413, 429), the
//! upstream's (502, 503, 504), or ours (500).

use std::cell::RefCell;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::SizedStream;
use actix_web::dev::{AppService, HttpServiceFactory, ResourceDef};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Payload;
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header as upstream_header;
use observability::middleware::{record_client, status_label};
use observability::request_id::propagation_headers;
use problem::Problem;
use sha2::{Digest, Sha256};
use tokio::time::Sleep;

use crate::auth::Authenticator;
use crate::client::{Lease, RequestBody, SendError, StreamedBody, UpstreamClient};
use crate::ratelimit::{Decision, RateLimiter};
use crate::upstream::{Admission, Endpoint, Upstream};

pub struct Route {
    pub prefix: String,
    pub upstream: Arc<Upstream>,
    pub upstream_prefix: String,
    pub timeout: Duration,
}

pub struct Gateway {
    pub routes: Vec<Route>,
    pub auth: Authenticator,
    pub limiter: RateLimiter,
    pub body_limit: u64,
    pub max_retries: u32,
}

/// Every path under `prefix` (and `prefix` itself), routed to [`proxy`].
///
/// A prefix resource matches by plain string comparison; the equivalent `{prefix}/{rest}*`
/// resource compiles to a regex, which cost about 8% of the gateway's CPU (routing plus the
/// metrics middleware's route lookup). Metrics and logs label these requests `prefix`.
pub struct PrefixRoute(pub String);

impl HttpServiceFactory for PrefixRoute {
    fn register(self, config: &mut AppService) {
        config.register_service(ResourceDef::prefix(self.0), None, web::to(proxy), None);
    }
}

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

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Idempotency keys are the client's own namespace: two clients choosing the same key must
/// not see each other's responses, so the key id goes in front (hashed when the result would
/// pass the upstream's 255-character limit).
fn scoped_idempotency_key(key_id: &str, value: &[u8]) -> Option<upstream_header::HeaderValue> {
    let scoped = format!("{key_id}:{}", String::from_utf8_lossy(value));
    let scoped = if scoped.len() <= 255 { scoped } else { format!("{key_id}:sha256:{:x}", Sha256::digest(value)) };
    upstream_header::HeaderValue::from_str(&scoped).ok()
}

fn forwardable(name: &str, connection: &[String]) -> bool {
    !NOT_FORWARDED.contains(&name) && !connection.iter().any(|listed| listed == name)
}

/// Header names listed in `Connection` are hop-by-hop too.
fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
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
fn rate_limit_header_values(decision: &Decision) -> [(HeaderName, HeaderValue); 3] {
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
}

fn rate_limit_headers(response: &mut HttpResponseBuilder, decision: &Decision) {
    for header in rate_limit_header_values(decision) {
        response.insert_header(header);
    }
}

fn problem_with_limits(problem: Problem, decision: &Decision) -> HttpResponse {
    let mut response = HttpResponse::from_error(problem);
    for (name, value) in rate_limit_header_values(decision) {
        response.headers_mut().insert(name, value);
    }
    response
}

fn body_too_large(limit: u64) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request bodies are limited to {limit} bytes"))
}

fn upstream_timed_out(upstream: &Upstream) -> Problem {
    Problem::new(StatusCode::GATEWAY_TIMEOUT, format!("upstream {} did not answer in time", upstream.name))
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// What the upstream is told about the request, whichever endpoint it goes to.
struct ForwardedHead<'a> {
    method: hyper::Method,
    /// The route's upstream prefix, the path below the route's prefix, and the query: put
    /// together below the endpoint's base path.
    upstream_prefix: &'a str,
    rest: &'a str,
    query: &'a str,
    headers: upstream_header::HeaderMap,
}

impl<'a> ForwardedHead<'a> {
    fn new(req: &'a HttpRequest, route: &'a Route, key_id: &str) -> Result<Self, Problem> {
        let rest = &req.path()[route.prefix.len()..];
        let method = hyper::Method::from_bytes(req.method().as_str().as_bytes())
            .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "unsupported method"))?;
        let connection = connection_tokens(req.headers().get_all(header::CONNECTION).map(HeaderValue::as_bytes));
        let mut headers = upstream_header::HeaderMap::with_capacity(req.headers().len() + 6);
        for (name, value) in req.headers() {
            let (name, value) = (name.as_str(), value.as_bytes());
            let value = if name == IDEMPOTENCY_KEY {
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
        Ok(Self { method, upstream_prefix: &route.upstream_prefix, rest, query: req.query_string(), headers })
    }

    fn into_request(self, endpoint: &Endpoint, body: RequestBody) -> Result<hyper::Request<RequestBody>, String> {
        let parts = [endpoint.path.as_str(), self.upstream_prefix, self.rest];
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
        request.headers_mut().insert(upstream_header::HOST, endpoint.host.clone());
        Ok(request)
    }
}

thread_local! {
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

/// How one attempt at the upstream went.
enum Attempt {
    Response(hyper::Response<Incoming>, Lease),
    /// No connection could be made: safe to retry, even for writes.
    ConnectFailed(String),
    TooLarge,
    TimedOut,
    Failed(String),
}

pub async fn proxy(
    req: HttpRequest,
    payload: Payload,
    client: web::Data<Rc<UpstreamClient>>,
) -> Result<HttpResponse, Problem> {
    // Borrowed, not extracted: extracting clones an `Arc` every worker shares, a contended
    // write on every request.
    let Some(gateway) = req.app_data::<web::Data<Gateway>>() else {
        return Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "the gateway is not configured"));
    };
    let path = req.path();
    let Some(route) = gateway
        .routes
        .iter()
        .find(|r| path == r.prefix || path.strip_prefix(r.prefix.as_str()).is_some_and(|rest| rest.starts_with('/')))
    else {
        return Err(Problem::not_found("no route matches this path"));
    };
    let caller = gateway.auth.authenticate(&req)?;
    record_client(&caller.key_id);

    let Some(decision) = gateway.limiter.check(caller).await else {
        return Err(Problem::unavailable("rate limiting is unavailable; retry shortly", 1));
    };
    if !decision.allowed {
        let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded for this API key")
            .with_header(header::RETRY_AFTER, decision.retry_after_secs.to_string());
        return Ok(problem_with_limits(problem, &decision));
    }

    let declared_length = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > gateway.body_limit) {
        return Ok(problem_with_limits(body_too_large(gateway.body_limit), &decision));
    }
    let has_body = declared_length.is_some_and(|l| l > 0) || req.headers().contains_key(header::TRANSFER_ENCODING);

    let upstream = &route.upstream;
    if let Admission::Shed(retry_after) = upstream.admit() {
        upstream.count("shed", None);
        let problem =
            Problem::unavailable(format!("upstream {} is unavailable (circuit open)", upstream.name), retry_after);
        return Ok(problem_with_limits(problem, &decision));
    }
    upstream.deposit_retry_budget();

    let started = Instant::now();
    let deadline = started + route.timeout;
    // One timer for the whole exchange (every attempt, backoff and the buffered body):
    // registered once, however often it is awaited.
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline.into()));
    let mut body = Some(RequestBody::Streamed { payload, remaining: gateway.body_limit });
    let retryable = is_idempotent(req.method()) && !has_body;
    let mut attempt_number = 0;
    let outcome = loop {
        let Some(endpoint) = upstream.pick() else {
            break Attempt::ConnectFailed("no endpoints configured".to_owned());
        };
        let request_body = if has_body {
            match body.take() {
                Some(body) => body,
                None => break Attempt::Failed("the request body was already sent".to_owned()),
            }
        } else {
            RequestBody::Empty
        };
        // Built for each attempt (the request takes it whole): a retry is rare, a copy is not.
        let head = match ForwardedHead::new(&req, route, &caller.key_id) {
            Ok(head) => head,
            Err(problem) => return Ok(problem_with_limits(problem, &decision)),
        };
        let request = match head.into_request(endpoint, request_body) {
            Ok(request) => request,
            Err(cause) => break Attempt::Failed(cause),
        };
        let sent = tokio::select! {
            biased;
            sent = client.send(&endpoint.address, request) => sent,
            () = timer.as_mut() => break Attempt::TimedOut,
        };
        let attempt = match sent {
            Ok((response, lease)) => Attempt::Response(response, lease),
            Err(SendError::Connect(cause)) => Attempt::ConnectFailed(cause),
            Err(SendError::BodyTooLarge) => Attempt::TooLarge,
            Err(SendError::Failed(cause)) => Attempt::Failed(cause),
        };
        let may_retry = attempt_number < gateway.max_retries && Instant::now() < deadline;
        match &attempt {
            Attempt::ConnectFailed(_) => upstream.eject(endpoint),
            Attempt::Response(response, _) if response.status() == hyper::StatusCode::SERVICE_UNAVAILABLE => {}
            _ => break attempt,
        }
        // Connection failures never reached the upstream; a 503 said "not now".
        if !(may_retry && (retryable || matches!(attempt, Attempt::ConnectFailed(_) if !has_body)))
            || !upstream.withdraw_retry()
        {
            break attempt;
        }
        attempt_number += 1;
        let backoff = Duration::from_millis(fastrand::u64(10..=25) * u64::from(attempt_number));
        let backoff_until = Instant::now().checked_add(backoff).unwrap_or(deadline);
        if backoff_until >= deadline {
            break Attempt::TimedOut;
        }
        tokio::time::sleep_until(backoff_until.into()).await;
    };

    let outcome_label = match &outcome {
        Attempt::Response(response, _) => {
            status_label(StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY))
        }
        Attempt::ConnectFailed(_) => "connect_error",
        Attempt::TooLarge => "body_too_large",
        Attempt::TimedOut => "timeout",
        Attempt::Failed(_) => "error",
    };
    upstream.count(outcome_label, Some(started.elapsed()));

    match outcome {
        Attempt::Response(response, lease) => {
            upstream.record(!response.status().is_server_error());
            Ok(relay(response, lease, route, &decision, timer).await)
        }
        Attempt::TooLarge => {
            // The upstream never saw the whole body; not its failure.
            upstream.record(true);
            Ok(problem_with_limits(body_too_large(gateway.body_limit), &decision))
        }
        Attempt::ConnectFailed(cause) => {
            upstream.record(false);
            tracing::warn!(upstream = %upstream.name, %cause, "upstream unreachable");
            Ok(problem_with_limits(
                Problem::unavailable(format!("upstream {} is unreachable", upstream.name), 1),
                &decision,
            ))
        }
        Attempt::TimedOut => {
            upstream.record(false);
            tracing::warn!(upstream = %upstream.name, timeout_ms = route.timeout.as_millis() as u64, "upstream timed out");
            Ok(problem_with_limits(upstream_timed_out(upstream), &decision))
        }
        Attempt::Failed(cause) => {
            upstream.record(false);
            tracing::warn!(upstream = %upstream.name, %cause, "upstream request failed");
            let problem = Problem::new(StatusCode::BAD_GATEWAY, format!("upstream {} failed to answer", upstream.name));
            Ok(problem_with_limits(problem, &decision))
        }
    }
}

/// Bodies up to this size are read whole (by the deadline) and sent with the head in one
/// write; larger or unsized ones stream.
const BUFFERED_BODY_LIMIT: u64 = 64 * 1024;

/// The upstream's response, with hop-by-hop headers dropped and `Location` rewritten to the
/// public prefix.
async fn relay(
    response: hyper::Response<Incoming>,
    lease: Lease,
    route: &Route,
    decision: &Decision,
    deadline: Pin<&mut Sleep>,
) -> HttpResponse {
    let (head, body) = response.into_parts();
    let status = StatusCode::from_u16(head.status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let connection = connection_tokens(head.headers.get_all(upstream_header::CONNECTION).iter().map(|v| v.as_bytes()));
    let mut builder = HttpResponse::build(status);
    for (name, value) in &head.headers {
        if name == upstream_header::LOCATION {
            let rewritten = value
                .to_str()
                .ok()
                .and_then(|location| location.strip_prefix(route.upstream_prefix.as_str()))
                .map(|rest| format!("{}{rest}", route.prefix));
            match rewritten {
                Some(location) => builder.insert_header((header::LOCATION, location)),
                None => builder.insert_header((header::LOCATION, value.as_bytes())),
            };
        } else if name != upstream_header::CONTENT_LENGTH
            // The gateway dates its own responses (actix's cached clock), as nginx does.
            && name != upstream_header::DATE
            && forwardable(name.as_str(), &connection)
        {
            // Names and values from a parsed response: valid here too.
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name.as_str().as_bytes()), HeaderValue::from_bytes(value.as_bytes()))
            {
                builder.append_header((name, value));
            }
        }
    }
    rate_limit_headers(&mut builder, decision);
    let length = head.headers.get(upstream_header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match length {
        Some(length) if length <= BUFFERED_BODY_LIMIT => {
            let read = Limited::new(body, BUFFERED_BODY_LIMIT as usize).collect();
            let collected = tokio::select! {
                biased;
                collected = read => Some(collected),
                () = deadline => None,
            };
            match collected {
                Some(Ok(collected)) => {
                    lease.release();
                    builder.body(collected.to_bytes())
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "upstream response body broke off");
                    HttpResponse::from_error(Problem::new(StatusCode::BAD_GATEWAY, "the upstream response broke off"))
                }
                None => {
                    tracing::warn!(timeout_ms = route.timeout.as_millis() as u64, "upstream response body timed out");
                    HttpResponse::from_error(upstream_timed_out(&route.upstream))
                }
            }
        }
        Some(length) => builder.body(SizedStream::new(length, StreamedBody::new(body, lease))),
        None => builder.streaming(StreamedBody::new(body, lease)),
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
}
