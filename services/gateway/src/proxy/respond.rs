//! The last phase of a proxied request: the upstream's answer relayed to the client, or the
//! problem that explains why there is none; counted either way.

use std::pin::Pin;
use std::time::Instant;

use actix_web::body::SizedStream;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::web::Bytes;
use actix_web::{HttpResponse, HttpResponseBuilder};
use http_body_util::{BodyExt, Limited};
use hyper::header as upstream_header;
use observability::middleware::status_label;
use tokio::time::Sleep;

use super::Route;
use super::admission::with_limits;
use super::failure::{ErrorSource, Failure};
use super::forward::Forwarded;
use super::headers::{connection_tokens, forwardable, rate_limit_header_values};
use crate::client::StreamedBody;
use crate::ratelimit::Decision;

/// Bodies up to this size are read whole (by the deadline) and sent with the head in one
/// write; larger or unsized ones stream.
const BUFFERED_BODY_LIMIT: u64 = 64 * 1024;

/// The response to the client for `result`, counted in the upstream's metrics and breaker.
pub async fn respond(
    result: Result<Forwarded, Failure>,
    head_only: bool,
    route: &Route,
    decision: &Decision,
    started: Instant,
    deadline: Pin<&mut Sleep>,
) -> HttpResponse {
    let upstream = &route.upstream;
    let forwarded = match result {
        Ok(forwarded) => forwarded,
        Err(failure) => return failed(failure, route, decision, started),
    };
    upstream.record_answer();
    let status = StatusCode::from_u16(forwarded.response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    upstream.count(status_label(status), Some(started.elapsed()));
    match relay(forwarded, status, head_only, route, decision, deadline).await {
        Ok(response) => response,
        Err(failure) => {
            tracing::warn!(upstream = %upstream.name, cause = failure.cause(), "upstream response body failed");
            with_limits(failure.problem(&upstream.name), decision)
        }
    }
}

/// The problem for a request that got no answer.
pub fn failed(failure: Failure, route: &Route, decision: &Decision, started: Instant) -> HttpResponse {
    let upstream = &route.upstream;
    let elapsed = (!matches!(failure, Failure::Shed { .. })).then(|| started.elapsed());
    let outcome = failure.outcome();
    upstream.count(outcome, elapsed);
    if failure.is_unreachable() {
        upstream.record_unreachable();
    }
    match failure.source() {
        ErrorSource::Downstream => {
            tracing::info!(upstream = %upstream.name, outcome, cause = failure.cause(), "request refused: the client's body");
        }
        ErrorSource::Upstream | ErrorSource::Internal => {
            tracing::warn!(
                upstream = %upstream.name,
                outcome,
                cause = failure.cause(),
                timeout_ms = route.timeout.as_millis() as u64,
                "upstream request failed"
            );
        }
    }
    with_limits(failure.problem(&upstream.name), decision)
}

/// The upstream's response, with hop-by-hop headers dropped and `Location` rewritten to the
/// public prefix. A HEAD response keeps the upstream's `Content-Length` and has no body.
async fn relay(
    forwarded: Forwarded,
    status: StatusCode,
    head_only: bool,
    route: &Route,
    decision: &Decision,
    deadline: Pin<&mut Sleep>,
) -> Result<HttpResponse, Failure> {
    let Forwarded { response, connection, in_flight } = forwarded;
    let (head, body) = response.into_parts();
    let mut builder = HttpResponse::build(status);
    copy_headers(&mut builder, &head.headers, route);
    for header in rate_limit_header_values(decision) {
        builder.insert_header(header);
    }
    let length = head.headers.get(upstream_header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let response = match length {
        Some(length) if head_only => {
            connection.release();
            builder.body(SizedStream::new(length, futures_util::stream::empty::<Result<Bytes, hyper::Error>>()))
        }
        Some(length) if length <= BUFFERED_BODY_LIMIT => {
            let read = Limited::new(body, BUFFERED_BODY_LIMIT as usize).collect();
            let collected = tokio::select! {
                biased;
                collected = read => collected.map_err(|error| Failure::ResponseBroken(error.to_string()))?,
                () = deadline => return Err(Failure::TimedOut),
            };
            connection.release();
            builder.body(collected.to_bytes())
        }
        Some(length) => builder.body(SizedStream::new(length, StreamedBody::new(body, connection))),
        None => builder.streaming(StreamedBody::new(body, connection)),
    };
    drop(in_flight);
    Ok(response)
}

fn copy_headers(builder: &mut HttpResponseBuilder, headers: &upstream_header::HeaderMap, route: &Route) {
    let connection = connection_tokens(headers.get_all(upstream_header::CONNECTION).iter().map(|v| v.as_bytes()));
    for (name, value) in headers {
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
}
