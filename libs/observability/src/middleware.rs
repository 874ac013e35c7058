//! [`Observe`]: the one middleware every service wraps its app in.
//!
//! Per request it: picks the request id; opens the root span (`request_id`, `method`, `route`,
//! `path`, and `client` once [`record_client`] names it) that every log line written while serving the request inherits; keeps
//! `api_active_requests` up; records `api_requests_total` and `api_request_duration_seconds`;
//! writes one access-log line; and sets `X-Request-ID` on the response. It wraps the whole
//! app, so this holds for 404s, handler errors and responses made by other middleware too.
//!
//! Metric labels are bounded: `endpoint` is the matched route template (`/v1/items/{id}`),
//! every unmatched path is [`UNMATCHED_ENDPOINT`], and unusual methods are `OTHER`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::future::{Ready, ready};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{Error, HttpMessage, HttpResponse, ResponseError};
use futures_util::future::LocalBoxFuture;
use metrics::{Counter, Gauge, Histogram, SharedString, counter, gauge, histogram};
use tracing::{Instrument, Span};

use crate::access_log::ACCESS_LOG_TARGET;
use crate::metrics::{ACTIVE_REQUESTS, REQUEST_DURATION_SECONDS, REQUESTS_TOTAL};
use crate::request_id::{REQUEST_ID_HEADER, RequestId};
use crate::telemetry::REQUEST_SPAN_TARGET;

/// The `endpoint` label of requests that matched no route.
pub const UNMATCHED_ENDPOINT: &str = "unmatched";
/// The `status` recorded when the client went away before the response was ready
/// (nginx's convention).
pub const CLIENT_CLOSED_STATUS: &str = "499";

/// Request id, root span, HTTP metrics and access log. Wrap it last so it is outermost.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observe;

impl<S, B> Transform<S, ServiceRequest> for Observe
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Transform = ObserveMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ObserveMiddleware { service }))
    }
}

pub struct ObserveMiddleware<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for ObserveMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let request_id = RequestId::from_incoming(req.headers());
        req.extensions_mut().insert(request_id.clone());
        let method = method_label(req.method());
        let metrics =
            EndpointMetrics::get(method, req.match_pattern().unwrap_or_else(|| UNMATCHED_ENDPOINT.to_owned()));
        let span = tracing::info_span!(
            target: REQUEST_SPAN_TARGET,
            "http_request",
            // Plain `&str` fields: recorded as JSON strings without a formatting pass.
            request_id = request_id.as_str(),
            method,
            route = &*metrics.endpoint,
            path = req.path(),
            client = tracing::field::Empty,
        );
        let in_flight = InFlight::start(metrics, span.clone());
        let response = span.in_scope(|| self.service.call(req));

        Box::pin(
            async move {
                match response.await {
                    Ok(mut response) => {
                        response.headers_mut().insert(REQUEST_ID, header_value(&request_id));
                        in_flight.finish(response.status(), response.response().error());
                        Ok(response)
                    }
                    // An inner middleware failed: actix turns the error into a response after
                    // we return, so the id rides on the error itself.
                    Err(error) => {
                        in_flight.finish(error.as_response_error().status_code(), Some(&error));
                        Err(WithRequestId { error, request_id }.into())
                    }
                }
            }
            .instrument(span),
        )
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);

fn header_value(request_id: &RequestId) -> HeaderValue {
    // Ids are validated or generated as `[A-Za-z0-9._:-]`, always a valid header value.
    HeaderValue::from_str(request_id.as_str()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// An error from inside the app that renders as the original error plus `X-Request-ID`.
#[derive(Debug)]
struct WithRequestId {
    error: Error,
    request_id: RequestId,
}

impl fmt::Display for WithRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl ResponseError for WithRequestId {
    fn status_code(&self) -> StatusCode {
        self.error.as_response_error().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = self.error.error_response();
        response.headers_mut().insert(REQUEST_ID, header_value(&self.request_id));
        response
    }
}

/// Metric handles of one (method, endpoint), resolved once per worker thread: a registry
/// lookup hashes and allocates a label set, and this runs on every request. The label
/// space is bounded (methods x route templates x statuses), so the cache is too.
struct EndpointMetrics {
    method: &'static str,
    endpoint: SharedString,
    active: Gauge,
    duration: Histogram,
    requests_by_status: RefCell<Vec<(&'static str, Counter)>>,
}

thread_local! {
    static ENDPOINTS: RefCell<HashMap<(&'static str, String), Rc<EndpointMetrics>>> = RefCell::new(HashMap::new());
}

impl EndpointMetrics {
    fn get(method: &'static str, endpoint: String) -> Rc<Self> {
        ENDPOINTS.with_borrow_mut(|cache| {
            cache
                .entry((method, endpoint))
                .or_insert_with_key(|(method, endpoint)| {
                    let endpoint = SharedString::from(Arc::<str>::from(endpoint.as_str()));
                    Rc::new(Self {
                        method,
                        active: gauge!(ACTIVE_REQUESTS, "method" => *method, "endpoint" => endpoint.clone()),
                        duration: histogram!(REQUEST_DURATION_SECONDS, "method" => *method, "endpoint" => endpoint.clone()),
                        endpoint,
                        requests_by_status: RefCell::new(Vec::new()),
                    })
                })
                .clone()
        })
    }

    fn count(&self, status: &'static str) {
        let mut counters = self.requests_by_status.borrow_mut();
        if let Some((_, counter)) = counters.iter().find(|(s, _)| *s == status) {
            counter.increment(1);
            return;
        }
        let counter =
            counter!(REQUESTS_TOTAL, "method" => self.method, "endpoint" => self.endpoint.clone(), "status" => status);
        counter.increment(1);
        counters.push((status, counter));
    }
}

/// One request being served. Dropping it without [`InFlight::finish`] means the client
/// disconnected and actix dropped the handler: it is then counted as [`CLIENT_CLOSED_STATUS`].
/// Either way the active-requests gauge comes back down.
struct InFlight {
    metrics: Rc<EndpointMetrics>,
    started: Instant,
    span: Span,
    finished: bool,
}

impl InFlight {
    fn start(metrics: Rc<EndpointMetrics>, span: Span) -> Self {
        metrics.active.increment(1.0);
        Self { metrics, started: Instant::now(), span, finished: false }
    }

    fn finish(mut self, status: StatusCode, error: Option<&Error>) {
        self.finished = true;
        let latency_ms = self.record(status_label(status));
        let status = status.as_u16();
        // `error` is the internal cause behind an error response: it goes to the log (with
        // the request id), never to the client.
        let error = error.map(tracing::field::display);
        if status >= 500 {
            tracing::error!(target: ACCESS_LOG_TARGET, status, latency_ms, error, "request completed");
        } else {
            tracing::info!(target: ACCESS_LOG_TARGET, status, latency_ms, error, "request completed");
        }
    }

    /// Counts the request and observes its duration; returns the latency in milliseconds.
    fn record(&self, status: &'static str) -> f64 {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.metrics.count(status);
        self.metrics.duration.record(elapsed);
        (elapsed * 1_000_000.0).round() / 1000.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.active.decrement(1.0);
        if !self.finished {
            let latency_ms = self.record(CLIENT_CLOSED_STATUS);
            self.span.in_scope(|| {
                tracing::info!(
                    target: ACCESS_LOG_TARGET,
                    status = 499,
                    latency_ms,
                    "client disconnected before the response was ready"
                );
            });
        }
    }
}

/// Status codes as static label values, interned once: there are at most 900 of them.
pub fn status_label(status: StatusCode) -> &'static str {
    static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (100..1000u16).map(|code| &*code.to_string().leak()).collect());
    labels.get(usize::from(status.as_u16()).saturating_sub(100)).copied().unwrap_or("other")
}

/// Names the authenticated client (an API key's id, never the key) on the current request's
/// root span, so every later log line of the request, the access line included, carries it.
pub fn record_client(client: &str) {
    tracing::Span::current().record("client", client);
}

/// Standard methods by name; anything else shares one label so that a scanner sending
/// made-up methods cannot create new series.
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "OTHER",
    }
}
