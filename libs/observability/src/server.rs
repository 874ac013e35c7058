//! The HTTP server settings every service shares.

use std::fmt;
use std::net::TcpListener;

use actix_http::{Request, Response};
use actix_service::IntoServiceFactory;
use actix_web::body::MessageBody;
use actix_web::dev::{AppConfig, Service, ServiceFactory};
use actix_web::{Error, HttpServer, Route, guard, web};
use serde::Deserialize;

use crate::shutdown::ShutdownSettings;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    /// 0 picks a free port (tests).
    pub port: u16,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
}

impl ServerSettings {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn worker_count(&self) -> usize {
        if self.workers == 0 { std::thread::available_parallelism().map_or(1, usize::from) } else { self.workers }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {address}: {source}")]
pub struct ListenError {
    pub address: String,
    pub source: std::io::Error,
}

/// Binds `address` (port 0 picks a free port) and returns the listener with its real port.
pub fn bind(address: &str) -> Result<(TcpListener, u16), ListenError> {
    let error = |source| ListenError { address: address.to_owned(), source };
    let listener = TcpListener::bind(address).map_err(error)?;
    let port = listener.local_addr().map_err(error)?.port();
    Ok((listener, port))
}

/// Worker count, a deep accept backlog, and the shutdown behaviour of [`crate::shutdown`]:
/// actix's own signal handling off, in-flight requests given the grace period. Handlers of
/// clients that hang up are dropped at once (no half-closed connections), so their work
/// stops and the active-requests gauge comes down.
pub fn configure<F, I, S, B>(
    server: HttpServer<F, I, S, B>,
    settings: &ServerSettings,
    shutdown: &ShutdownSettings,
) -> HttpServer<F, I, S, B>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    server
        .workers(settings.worker_count())
        .backlog(4096)
        .h1_allow_half_closed(false)
        .disable_signals()
        .shutdown_timeout(shutdown.grace_period_secs)
}

/// A route for `GET` and `HEAD`: wherever a resource can be read, its headers alone can be
/// asked for too (RFC 9110 section 9.3.2). actix writes the head a `GET` would get, with its
/// `Content-Length`, and no body.
pub fn get_or_head() -> Route {
    web::route().guard(guard::Any(guard::Get()).or(guard::Head()))
}
