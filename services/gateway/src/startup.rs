//! Building and running the gateway: the public listener (the API, `/health`, `/ready`) and
//! the admin listener (`/metrics`, `/health`, `/ready`).

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use async_trait::async_trait;
use observability::health::configure_health;
use observability::metrics::{Metrics, configure_metrics};
use observability::shutdown::{ShutdownSettings, serve_until_stopped};
use observability::{HealthCheck, HealthRegistry, Observe, ServiceInfo, server};
use problem::{Problem, ProblemJson};
use redis_access::RedisCheck;

use crate::auth::{Authenticator, KeysError};
use crate::client::UpstreamClient;
use crate::configuration::Settings;
use crate::proxy::{Gateway, PrefixRoute, Route};
use crate::ratelimit::RateLimiter;
use crate::upstream::{InvalidUrl, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("route {prefix}: unknown upstream {upstream:?}")]
    UnknownUpstream { prefix: String, upstream: String },
    #[error("route prefix {0:?}: must start with '/' and hold no '{{' or '}}'")]
    InvalidPrefix(String),
    #[error("upstream {0}: no urls")]
    EmptyUpstream(String),
    #[error("upstream {name}: {source}")]
    InvalidUpstream { name: String, source: InvalidUrl },
    #[error("rate_limit.redis_url: {0}")]
    Redis(#[from] redis_access::RedisError),
    #[error(transparent)]
    Metrics(#[from] observability::metrics::MetricsError),
    #[error(transparent)]
    Listen(#[from] server::ListenError),
}

pub struct Application {
    port: u16,
    admin_port: u16,
    server: Server,
    admin: Server,
    health: HealthRegistry,
    shutdown: ShutdownSettings,
}

impl Application {
    pub fn build(settings: Settings, service: ServiceInfo) -> Result<Self, StartupError> {
        // First: everything below may already set metrics (the breakers' initial state).
        let metrics = Metrics::install(&service)?;
        describe_metrics();
        let upstreams: Vec<Arc<Upstream>> = settings
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                if upstream.urls.is_empty() {
                    return Err(StartupError::EmptyUpstream(name.clone()));
                }
                let upstream = Upstream::new(name, &upstream.urls, &settings.proxy)
                    .map_err(|source| StartupError::InvalidUpstream { name: name.clone(), source })?;
                Ok(Arc::new(upstream))
            })
            .collect::<Result<_, _>>()?;
        let routes = settings
            .routes
            .iter()
            .map(|route| {
                if !route.prefix.starts_with('/') || route.prefix.contains(['{', '}']) {
                    return Err(StartupError::InvalidPrefix(route.prefix.clone()));
                }
                let upstream = upstreams.iter().find(|u| u.name == route.upstream).cloned().ok_or_else(|| {
                    StartupError::UnknownUpstream { prefix: route.prefix.clone(), upstream: route.upstream.clone() }
                })?;
                Ok(Route {
                    prefix: route.prefix.trim_end_matches('/').to_owned(),
                    upstream,
                    upstream_prefix: route.upstream_prefix.trim_end_matches('/').to_owned(),
                    timeout: Duration::from_millis(route.timeout_ms),
                })
            })
            .collect::<Result<Vec<_>, StartupError>>()?;
        let auth = Authenticator::from_settings(&settings.auth)?;
        tracing::info!(keys = auth.key_count(), routes = routes.len(), "configuration loaded");
        let limiter = RateLimiter::new(&settings.rate_limit, auth.clients())?;
        let checks: Vec<Arc<dyn HealthCheck>> = vec![
            // Reported, not critical: without Redis each replica limits on its own.
            Arc::new(RedisCheck(limiter.redis().clone())),
            Arc::new(UpstreamsReachable(upstreams.iter().flat_map(|u| u.endpoint_addresses()).collect())),
        ];
        let health = HealthRegistry::new(&settings.health, checks);
        let gateway = web::Data::new(Gateway {
            routes,
            auth,
            limiter,
            body_limit: settings.proxy.body_limit_bytes,
            max_retries: settings.proxy.max_retries,
        });
        let connect_timeout = Duration::from_millis(settings.proxy.connect_timeout_ms);
        let idle_timeout = Duration::from_millis(settings.proxy.idle_timeout_ms);
        let prefixes: Vec<String> = gateway.routes.iter().map(|r| r.prefix.clone()).collect();

        let (listener, port) = server::bind(&settings.server.address())?;
        let server = HttpServer::new({
            let (service, health) = (service.clone(), health.clone());
            move || {
                let client = UpstreamClient::new(connect_timeout, idle_timeout);
                let mut app = App::new()
                    .wrap(ProblemJson)
                    .wrap(Observe)
                    .app_data(gateway.clone())
                    .app_data(web::Data::new(client))
                    .configure(configure_health(service.clone(), health.clone()));
                // Real resources, so metrics label proxied requests by route, not `unmatched`.
                for prefix in &prefixes {
                    app = app.service(PrefixRoute(prefix.clone()));
                }
                app.default_service(web::to(|| async { Problem::not_found("no route matches this path") }))
            }
        });
        let server = server::configure(server, &settings.server, &settings.shutdown)
            .listen(listener)
            .map_err(|source| server::ListenError { address: settings.server.address(), source })?
            .run();

        let admin_address = format!("{}:{}", settings.admin.host, settings.admin.port);
        let (admin_listener, admin_port) = server::bind(&admin_address)?;
        let admin = HttpServer::new({
            let health = health.clone();
            move || {
                App::new()
                    .wrap(ProblemJson)
                    .wrap(Observe)
                    .configure(configure_health(service.clone(), health.clone()))
                    .configure(configure_metrics(metrics.clone()))
            }
        })
        .workers(1)
        .disable_signals()
        .listen(admin_listener)
        .map_err(|source| server::ListenError { address: admin_address, source })?
        .run();
        tracing::info!(port, admin_port, "gateway listening");
        Ok(Self { port, admin_port, server, admin, health, shutdown: settings.shutdown })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Serves until a signal drains the public listener; the admin listener (metrics) stays
    /// up during the drain and stops last.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let admin = self.admin.handle();
        let admin_task = tokio::spawn(self.admin);
        let result = serve_until_stopped(self.server, self.health, &self.shutdown).await;
        admin.stop(true).await;
        let _ = admin_task.await;
        result
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_upstream_requests_total",
        "Requests sent upstream, by upstream and outcome (status code, connect_error, timeout, shed, ...)."
    );
    metrics::describe_histogram!(
        "gateway_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time from the first attempt to the upstream's response head, retries included."
    );
    metrics::describe_counter!(
        "gateway_ratelimit_decisions_total",
        "Rate-limit decisions by key id; *_local when Redis could not be asked."
    );
    metrics::describe_gauge!("gateway_circuit_state", "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open.");
    metrics::describe_counter!(
        "gateway_auth_failures_total",
        "Requests refused for a missing, malformed or unknown API key."
    );
    metrics::describe_counter!(
        "gateway_ratelimit_redis_errors_total",
        "Rate-limit Redis commands that failed or timed out."
    );
}

/// Reported, not critical: a failing data service must not take every gateway replica out
/// of the load balancer.
struct UpstreamsReachable(Vec<String>);

#[async_trait]
impl HealthCheck for UpstreamsReachable {
    fn name(&self) -> &'static str {
        "upstreams"
    }
    fn critical(&self) -> bool {
        false
    }
    async fn check(&self) -> Result<(), String> {
        let mut unreachable = Vec::new();
        for address in &self.0 {
            if tokio::net::TcpStream::connect(address).await.is_err() {
                unreachable.push(address.as_str());
            }
        }
        if unreachable.is_empty() { Ok(()) } else { Err(format!("cannot connect to {}", unreachable.join(", "))) }
    }
}
