//! The proxy: route, authenticate, rate-limit, forward with retries and a deadline, stream
//! both ways.
//!
//! Errors follow pingora's split: the client's fault (downstream: 401, 404, 413, 429), the
//! upstream's (502, 503, 504), or ours (500).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::SizedStream;
use actix_web::dev::{AppService, HttpServiceFactory, ResourceDef};
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::{Bytes, Payload};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder, web};
use awc::error::{ConnectError, SendRequestError};
use futures_util::Stream;
use observability::middleware::{record_client, status_label};
use observability::request_id::propagation_headers;
use problem::Problem;
use sha2::{Digest, Sha256};

use crate::auth::Authenticator;
use crate::ratelimit::{Decision, RateLimiter};
use crate::upstream::{Admission, Upstream};

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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Idempotency keys are the client's own namespace: two clients choosing the same key must
/// not see each other's responses, so the key id goes in front (hashed when the result would
/// pass the upstream's 255-character limit).
fn scoped_idempotency_key(key_id: &str, value: &HeaderValue) -> HeaderValue {
    let scoped = format!("{key_id}:{}", String::from_utf8_lossy(value.as_bytes()));
    let scoped =
        if scoped.len() <= 255 { scoped } else { format!("{key_id}:sha256:{:x}", Sha256::digest(value.as_bytes())) };
    HeaderValue::from_str(&scoped).unwrap_or_else(|_| value.clone())
}

fn forwardable(name: &HeaderName, connection: &[String]) -> bool {
    let name = name.as_str();
    !NOT_FORWARDED.contains(&name) && !connection.iter().any(|listed| listed == name)
}

/// Header names listed in `Connection` are hop-by-hop too.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The `RateLimit-*` headers every response carries.
fn rate_limit_header_values(decision: &Decision) -> [(HeaderName, HeaderValue); 3] {
    [
        (RATELIMIT_LIMIT, HeaderValue::from(decision.limit)),
        (RATELIMIT_REMAINING, HeaderValue::from(decision.remaining)),
        (RATELIMIT_RESET, HeaderValue::from(decision.reset_secs)),
    ]
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

/// Fails the stream once more than `limit` bytes have passed, so an oversized body is
/// refused while it streams, without being held in memory.
struct Limited {
    inner: Payload,
    remaining: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
struct BodyTooLarge;

impl Stream for Limited {
    type Item = Result<Bytes, Box<dyn std::error::Error>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let size = chunk.len() as u64;
                if size > self.remaining {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                }
                self.remaining -= size;
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// How one attempt at the upstream went.
enum Attempt {
    Response(awc::ClientResponse),
    /// No connection could be made: safe to retry, even for writes.
    ConnectFailed(String),
    TooLarge,
    TimedOut,
    Failed(String),
}

fn classify(error: SendRequestError) -> Attempt {
    match error {
        SendRequestError::Timeout => Attempt::TimedOut,
        SendRequestError::Connect(
            ConnectError::Timeout | ConnectError::Io(_) | ConnectError::Resolver(_) | ConnectError::NoRecords,
        ) => Attempt::ConnectFailed(error.to_string()),
        SendRequestError::Body(ref inner) if inner.to_string().contains("over the limit") => Attempt::TooLarge,
        other => Attempt::Failed(other.to_string()),
    }
}

pub async fn proxy(
    req: HttpRequest,
    payload: Payload,
    gateway: web::Data<Gateway>,
    client: web::Data<awc::Client>,
) -> Result<HttpResponse, Problem> {
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

    let Some(decision) = gateway.limiter.check(&caller).await else {
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

    let rest = &path[route.prefix.len()..];
    let target = match req.query_string() {
        "" => format!("{}{rest}", route.upstream_prefix),
        query => format!("{}{rest}?{query}", route.upstream_prefix),
    };
    let connection = connection_tokens(req.headers());
    let forwarded_for = match (req.headers().get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()), req.peer_addr()) {
        (Some(previous), Some(peer)) => format!("{previous}, {}", peer.ip()),
        (None, Some(peer)) => peer.ip().to_string(),
        (Some(previous), None) => previous.to_owned(),
        (None, None) => String::new(),
    };
    let host = req.connection_info().host().to_owned();

    let started = Instant::now();
    let deadline = started + route.timeout;
    let mut body = Some(Limited { inner: payload, remaining: gateway.body_limit });
    let retryable = is_idempotent(req.method()) && !has_body;
    let mut attempt_number = 0;
    let outcome = loop {
        let Some(endpoint) = upstream.pick() else {
            break Attempt::ConnectFailed("no endpoints configured".to_owned());
        };
        let mut request = client.request(req.method().clone(), format!("{}{target}", endpoint.base));
        for (name, value) in req.headers() {
            if name.as_str() == IDEMPOTENCY_KEY {
                request = request.insert_header((name.clone(), scoped_idempotency_key(&caller.key_id, value)));
            } else if forwardable(name, &connection) {
                request = request.append_header((name.clone(), value.clone()));
            }
        }
        for (name, value) in propagation_headers(&req) {
            request = request.insert_header((name, value));
        }
        if !forwarded_for.is_empty() {
            request = request.insert_header((X_FORWARDED_FOR, forwarded_for.as_str()));
        }
        request = request
            .insert_header((X_FORWARDED_PROTO, HeaderValue::from_static("http")))
            .insert_header((X_FORWARDED_HOST, host.as_str()));

        let sent = if has_body {
            match body.take() {
                Some(stream) => request.send_stream(stream),
                None => break Attempt::Failed("the request body was already sent".to_owned()),
            }
        } else {
            request.send()
        };
        let attempt = match tokio::time::timeout_at(deadline.into(), sent).await {
            Err(_) => break Attempt::TimedOut,
            Ok(Ok(response)) => Attempt::Response(response),
            Ok(Err(error)) => classify(error),
        };
        let may_retry = attempt_number < gateway.max_retries && Instant::now() < deadline;
        match &attempt {
            Attempt::ConnectFailed(_) => upstream.eject(endpoint),
            Attempt::Response(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {}
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
        tokio::time::sleep_until(Instant::now().checked_add(backoff).unwrap_or(deadline).min(deadline).into()).await;
    };

    let outcome_label = match &outcome {
        Attempt::Response(response) => status_label(response.status()),
        Attempt::ConnectFailed(_) => "connect_error",
        Attempt::TooLarge => "body_too_large",
        Attempt::TimedOut => "timeout",
        Attempt::Failed(_) => "error",
    };
    upstream.count(outcome_label, Some(started.elapsed()));

    match outcome {
        Attempt::Response(response) => {
            upstream.record(!response.status().is_server_error());
            Ok(relay(response, route, &decision).await)
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
            let problem =
                Problem::new(StatusCode::GATEWAY_TIMEOUT, format!("upstream {} did not answer in time", upstream.name));
            Ok(problem_with_limits(problem, &decision))
        }
        Attempt::Failed(cause) => {
            upstream.record(false);
            tracing::warn!(upstream = %upstream.name, %cause, "upstream request failed");
            let problem = Problem::new(StatusCode::BAD_GATEWAY, format!("upstream {} failed to answer", upstream.name));
            Ok(problem_with_limits(problem, &decision))
        }
    }
}

/// Bodies up to this size are read whole and sent with the head in one write; larger or
/// unsized ones stream.
const BUFFERED_BODY_LIMIT: u64 = 64 * 1024;

/// The upstream's response, with hop-by-hop headers dropped and `Location` rewritten to the
/// public prefix.
async fn relay(mut response: awc::ClientResponse, route: &Route, decision: &Decision) -> HttpResponse {
    let connection = connection_tokens(response.headers());
    let mut builder = HttpResponse::build(response.status());
    for (name, value) in response.headers() {
        if name == header::LOCATION {
            let rewritten = value
                .to_str()
                .ok()
                .and_then(|location| location.strip_prefix(route.upstream_prefix.as_str()))
                .map(|rest| format!("{}{rest}", route.prefix));
            match rewritten {
                Some(location) => builder.insert_header((header::LOCATION, location)),
                None => builder.insert_header((name.clone(), value.clone())),
            };
        } else if name != header::CONTENT_LENGTH && forwardable(name, &connection) {
            builder.append_header((name.clone(), value.clone()));
        }
    }
    rate_limit_headers(&mut builder, decision);
    let length = response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match length {
        Some(length) if length <= BUFFERED_BODY_LIMIT => {
            match response.body().limit(BUFFERED_BODY_LIMIT as usize).await {
                Ok(body) => builder.body(body),
                Err(error) => {
                    tracing::warn!(%error, "upstream response body broke off");
                    HttpResponse::from_error(Problem::new(StatusCode::BAD_GATEWAY, "the upstream response broke off"))
                }
            }
        }
        Some(length) => builder.body(SizedStream::new(length, response)),
        None => builder.streaming(response),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_including_those_named_in_connection_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Custom-Hop"));
        let listed = connection_tokens(&headers);
        assert!(!forwardable(&HeaderName::from_static("x-custom-hop"), &listed));
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
            assert!(!forwardable(&HeaderName::from_static(name), &listed), "{name}");
        }
        assert!(forwardable(&HeaderName::from_static("x-kept"), &listed));
        assert!(forwardable(&header::CONTENT_TYPE, &listed));
    }
}
