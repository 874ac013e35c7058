//! The first phase of a proxied request: who is asking, whether they may, and whether the
//! request is one the gateway will forward. Everything refused here is the client's doing
//! and never reaches an upstream.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};
use actix_web::{HttpRequest, HttpResponse};
use observability::middleware::record_client;
use problem::Problem;

use super::Gateway;
use super::failure::body_too_large;
use super::headers::rate_limit_header_values;
use crate::auth::Caller;
use crate::ratelimit::Decision;

/// A request that may go on, with the rate-limit decision every response reports.
pub struct Admitted<'g> {
    pub caller: &'g Caller,
    pub decision: Decision,
}

/// The caller and its rate-limit decision, or the response that refuses the request.
pub async fn admit<'g>(gateway: &'g Gateway, req: &HttpRequest) -> Result<Admitted<'g>, HttpResponse> {
    let caller = gateway.auth.authenticate(req).map_err(HttpResponse::from_error)?;
    record_client(&caller.key_id);
    let Some(decision) = gateway.limiter.check(caller).await else {
        return Err(HttpResponse::from_error(Problem::unavailable("rate limiting is unavailable; retry shortly", 1)));
    };
    if !decision.allowed {
        let problem = Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded for this API key")
            .with_header(header::RETRY_AFTER, decision.retry_after_secs.to_string());
        return Err(with_limits(problem, &decision));
    }
    if let Some(problem) = refusal(req.headers(), gateway.limits.body_limit) {
        return Err(with_limits(problem, &decision));
    }
    Ok(Admitted { caller, decision })
}

/// What is wrong with the request itself, if anything: a declared body over the limit, or
/// an `Idempotency-Key` the upstream would refuse (judged as the client sent it, before the
/// gateway scopes it to the client).
fn refusal(headers: &HeaderMap, body_limit: u64) -> Option<Problem> {
    if declared_length(headers).is_some_and(|length| length > body_limit) {
        return Some(body_too_large(body_limit));
    }
    let mut keys = headers.get_all(idempotency_key::HEADER);
    if let Some(key) = keys.next()
        && (keys.next().is_some() || idempotency_key::parse(key.as_bytes()).is_err())
    {
        return Some(Problem::bad_request(idempotency_key::RULE));
    }
    None
}

/// `Content-Length`, when the client declared one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// `problem` as a response carrying the `RateLimit-*` headers of `decision`.
pub fn with_limits(problem: Problem, decision: &Decision) -> HttpResponse {
    let mut response = HttpResponse::from_error(problem);
    for (name, value) in rate_limit_header_values(decision) {
        response.headers_mut().insert(name, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(HeaderName::from_static(name), HeaderValue::from_bytes(value).unwrap());
        }
        headers
    }

    #[test]
    fn oversized_bodies_and_keys_the_data_service_forbids_are_refused() {
        assert!(refusal(&headers(&[("content-length", b"10")]), 10).is_none());
        assert_eq!(refusal(&headers(&[("content-length", b"11")]), 10).unwrap().status(), 413);
        assert!(refusal(&headers(&[("idempotency-key", b"order-1")]), 10).is_none());
        let long = "k".repeat(256);
        for bad in [long.as_bytes(), b"caf\xc3\xa9", b"tab\tkey"] {
            let problem = refusal(&headers(&[("idempotency-key", bad)]), 10).expect("refused");
            assert_eq!((problem.status().as_u16(), problem.detail()), (400, idempotency_key::RULE));
        }
        let twice = headers(&[("idempotency-key", b"a"), ("idempotency-key", b"b")]);
        assert_eq!(refusal(&twice, 10).unwrap().status(), 400, "one key per request");
    }
}
