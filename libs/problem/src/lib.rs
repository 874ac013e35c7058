//! Every error a service returns is `application/problem+json` (RFC 9457):
//!
//! ```json
//! {"type":"about:blank","title":"Not Found","status":404,"detail":"item ... not found","request_id":"..."}
//! ```
//!
//! Handlers fail with a [`Problem`]; the [`ProblemJson`] middleware renders it, and also every
//! other error response (actix's own 404/405/413/415, extractor errors, errors raised by
//! middleware, bare error statuses), adding the request id. Server errors that are not a [`Problem`] never show
//! their cause to the client: it stays on the response for the access log.
//!
//! A handler that panics answers 500 like any other server error, instead of dropping the
//! connection; the panic message goes to the access log, and the worker keeps serving.

use std::any::Any;
use std::fmt;
use std::future::{Ready, ready};
use std::panic::AssertUnwindSafe;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{Error, HttpMessage, HttpRequest, HttpResponse, Responder, ResponseError};
use futures_util::FutureExt;
use futures_util::future::LocalBoxFuture;
use observability::RequestId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// What went wrong, in words a client may see.
#[derive(Clone, Debug)]
pub struct Problem {
    status: StatusCode,
    detail: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// The JSON document of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProblemDocument {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// The HTTP reason phrase of `status`.
    pub title: String,
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The request's `X-Request-ID`: quote it when reporting a problem.
    pub request_id: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self { status, detail: detail.into(), headers: Vec::new() }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, detail)
    }

    pub fn precondition_failed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PRECONDITION_FAILED, detail)
    }

    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, detail)
    }

    /// 503 with `Retry-After`, for a dependency that is down: the client may try again.
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, detail)
            .with_header(header::RETRY_AFTER, retry_after_secs.to_string())
    }

    /// A server-side failure whose cause must not reach the client.
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, GENERIC_SERVER_ERROR)
    }

    /// 405 with the `Allow` header listing what the resource does support.
    pub fn method_not_allowed(allowed: &[&str]) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, format!("allowed methods: {}", allowed.join(", ")))
            .with_header(header::ALLOW, allowed.join(", "))
    }

    /// Adds a response header. Values that are not valid header text are dropped.
    pub fn with_header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(value) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, value));
        }
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    fn to_json(&self, request_id: Option<&RequestId>) -> Vec<u8> {
        let body = ProblemDocument {
            problem_type: "about:blank".to_owned(),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            request_id: request_id.map(|id| id.as_str().to_owned()),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

const GENERIC_SERVER_ERROR: &str = "the server failed to handle this request; quote the request id when reporting it";

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.detail)
    }
}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    /// Status and headers only: [`ProblemJson`] writes the body, which needs the request id.
    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::new(self.status);
        for (name, value) in &self.headers {
            response.headers_mut().append(name.clone(), value.clone());
        }
        response
    }
}

/// Lets a handler answer with a bare problem (`web::to(|| async { Problem::not_found(..) })`).
impl Responder for Problem {
    type Body = BoxBody;

    fn respond_to(self, _: &HttpRequest) -> HttpResponse {
        HttpResponse::from_error(self)
    }
}

/// The problem a response stands for: its own [`Problem`] when it has one; otherwise the
/// status with the error's text for client errors, and a generic text for server errors.
fn problem_for(status: StatusCode, error: Option<&Error>) -> Problem {
    if let Some(problem) = error.and_then(|e| e.as_error::<Problem>()) {
        return problem.clone();
    }
    let detail = match error {
        Some(error) if status.is_client_error() => error.to_string(),
        _ if status.is_server_error() => GENERIC_SERVER_ERROR.to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    Problem::new(status, detail)
}

/// Renders every 4xx/5xx response as problem+json. Install it inside [`observability::Observe`]
/// (wrap it first), so that the request id is known.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProblemJson;

impl<S, B> Transform<S, ServiceRequest> for ProblemJson
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = ProblemJsonMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ProblemJsonMiddleware { service }))
    }
}

pub struct ProblemJsonMiddleware<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for ProblemJsonMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let request_id = req.extensions().get::<RequestId>().cloned();
        // A panic while building the handler's future or while polling it.
        let response = std::panic::catch_unwind(AssertUnwindSafe(|| self.service.call(req)));
        Box::pin(async move {
            let outcome = match response {
                Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
                Err(payload) => Err(payload),
            };
            match outcome.unwrap_or_else(|payload| Err(Panicked::from_payload(payload).into())) {
                Ok(response) if needs_rendering(&response) => {
                    let problem = problem_for(response.status(), response.response().error());
                    let body = problem.to_json(request_id.as_ref());
                    // `map_body` keeps the original error on the response for the access log.
                    Ok(response.map_body(|head, _| {
                        head.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
                        EitherBody::right(BoxBody::new(body))
                    }))
                }
                Ok(response) => Ok(response.map_into_left_body()),
                Err(error) => {
                    let problem = problem_for(error.as_response_error().status_code(), Some(&error));
                    Err(Rendered { body: problem.to_json(request_id.as_ref()), problem, cause: error }.into())
                }
            }
        })
    }
}

/// A handler panicked; its message is the internal cause (logged, never sent).
#[derive(Debug)]
struct Panicked(String);

impl Panicked {
    fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = match payload.downcast::<String>() {
            Ok(message) => *message,
            Err(payload) => payload.downcast_ref::<&str>().map_or("(no message)", |m| m).to_owned(),
        };
        Self(message)
    }
}

impl fmt::Display for Panicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "handler panicked: {}", self.0)
    }
}

impl ResponseError for Panicked {}

/// Error responses made from an error, or with no content type. A handler that built its
/// own typed error body on purpose (readiness' 503 report) keeps it.
fn needs_rendering<B>(response: &ServiceResponse<B>) -> bool {
    let status = response.status();
    (status.is_client_error() || status.is_server_error())
        && (response.response().error().is_some() || !response.headers().contains_key(header::CONTENT_TYPE))
}

/// An error raised by an inner middleware, already rendered: actix turns it into the
/// response after the middleware chain has returned.
#[derive(Debug)]
struct Rendered {
    problem: Problem,
    body: Vec<u8>,
    cause: Error,
}

impl fmt::Display for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.cause, f)
    }
}

impl ResponseError for Rendered {
    fn status_code(&self) -> StatusCode {
        self.problem.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = self.problem.error_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        response.set_body(BoxBody::new(self.body.clone()))
    }
}

#[cfg(test)]
mod panic_tests {
    use actix_web::{App, test, web};

    use super::*;

    async fn panics_while_polled() -> &'static str {
        panic!("broken invariant")
    }

    fn panics_while_called() -> Ready<&'static str> {
        panic!("before any future")
    }

    #[actix_web::test]
    async fn a_panicking_handler_answers_500_problem_and_the_app_keeps_serving() {
        let app = test::init_service(
            App::new()
                .wrap(ProblemJson)
                .route("/while-polled", web::get().to(panics_while_polled))
                .route("/while-called", web::get().to(panics_while_called))
                .route("/fine", web::get().to(|| async { "fine" })),
        )
        .await;
        for path in ["/while-polled", "/while-called"] {
            // The middleware hands actix an error, which actix renders as the response.
            let error = test::try_call_service(&app, test::TestRequest::get().uri(path).to_request())
                .await
                .expect_err("a panic is an error response");
            assert!(error.to_string().contains("handler panicked"), "{path}: the cause stays for the log: {error}");
            let response = error.error_response();
            assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR, "{path}");
            assert_eq!(response.headers().get(header::CONTENT_TYPE).unwrap(), CONTENT_TYPE, "{path}");
            let body = actix_web::body::to_bytes(response.into_body()).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["status"], 500);
            assert!(!body["detail"].as_str().unwrap().contains("panicked"), "the message is not sent: {body}");
        }
        let response = test::call_service(&app, test::TestRequest::get().uri("/fine").to_request()).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
}
