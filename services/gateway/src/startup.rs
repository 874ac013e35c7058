//! Building and running the gateway: the public listener (the API, `/health`, `/ready`) and
//! the admin listener (`/metrics`, `/health`, `/ready`). Configuration arrives checked
//! ([`Settings::routing`]); this only wires.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use async_trait::async_trait;
use observability::health::configure_health;
use observability::metrics::{Metrics, configure_metrics};
use observability::shutdown::{ShutdownSettings, serve_until_stopped};
use observability::{BackgroundTasks, CloseWhileDraining, HealthCheck, HealthRegistry, Observe, ServiceInfo, server};
use problem::{Problem, ProblemJson};
use redis_access::RedisCheck;

use crate::auth::{Authenticator, KeysError};
use crate::client::UpstreamClient;
use crate::configuration::{InvalidSettings, Settings};
use crate::proxy::forward::BodyLimits;
use crate::proxy::{Gateway, PrefixRoute, Route};
use crate::ratelimit::RateLimiter;
use crate::upstream::Upstream;
use crate::upstream::discovery::{Resolve, SystemResolver};

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Settings(#[from] InvalidSettings),
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("rate_limit.redis_url: {0}")]
    Redis(#[from] redis_access::RedisError),
    #[error(transparent)]
    Metrics(#[from] observability::metrics::MetricsError),
    #[error(transparent)]
    Listen(#[from] server::ListenError),
}

/// How long the first resolution of upstream host names may hold up the start; after it,
/// discovery keeps trying in the background.
const FIRST_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Application {
    port: u16,
    admin_port: u16,
    server: Server,
    admin: Server,
    health: HealthRegistry,
    background: BackgroundTasks,
    shutdown: ShutdownSettings,
}

impl Application {
    pub async fn build(settings: Settings, service: ServiceInfo) -> Result<Self, StartupError> {
        Self::build_with_resolver(settings, service, Arc::new(SystemResolver)).await
    }

    /// [`Application::build`] with host names resolved by `resolver` (tests bring their own).
    pub async fn build_with_resolver(
        settings: Settings,
        service: ServiceInfo,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Self, StartupError> {
        let routing = settings.routing()?;
        // First: everything below may already set metrics (the breakers' initial state).
        let metrics = Metrics::install(&service)?;
        describe_metrics();
        let upstreams: Vec<Arc<Upstream>> = routing
            .upstreams
            .into_iter()
            .map(|target| Arc::new(Upstream::new(target, &settings.proxy, resolver.clone())))
            .collect();
        for upstream in upstreams.iter().filter(|u| u.is_discovered()) {
            if tokio::time::timeout(FIRST_DISCOVERY_TIMEOUT, upstream.discover()).await.is_err() {
                tracing::warn!(upstream = %upstream.name, "upstream host names not resolved yet; still trying");
            }
        }
        let routes: Vec<Arc<Route>> =
            routing.routes.into_iter().map(|target| Arc::new(Route::new(target, &upstreams))).collect();
        let auth = Authenticator::from_settings(&settings.auth)?;
        tracing::info!(keys = auth.key_count(), routes = routes.len(), "configuration loaded");
        let limiter = RateLimiter::new(&settings.rate_limit, auth.callers())?;
        let checks: Vec<Arc<dyn HealthCheck>> = vec![
            // Reported, not critical: without Redis each replica limits on its own.
            Arc::new(RedisCheck(limiter.redis().clone())),
            Arc::new(UpstreamsInRotation(upstreams.clone())),
        ];
        let health = HealthRegistry::new(&settings.health, checks);
        let metrics = metrics.with_collector({
            let upstreams = upstreams.clone();
            move || upstreams.iter().for_each(|upstream| upstream.publish_gauges())
        });
        let background = background_work(&upstreams, Duration::from_millis(settings.proxy.dns_refresh_ms));
        let gateway = web::Data::new(Gateway {
            auth,
            limiter,
            limits: BodyLimits {
                body_limit: settings.proxy.body_limit_bytes,
                replay_buffer: settings.proxy.replay_buffer_bytes,
            },
            max_retries: settings.proxy.max_retries,
        });
        let connect_timeout = Duration::from_millis(settings.proxy.connect_timeout_ms);
        let idle_timeout = Duration::from_millis(settings.proxy.idle_timeout_ms);

        let (listener, port) = server::bind(&settings.server.address())?;
        let server = HttpServer::new({
            let (service, health) = (service.clone(), health.clone());
            move || {
                let client = UpstreamClient::new(connect_timeout, idle_timeout);
                let mut app = App::new()
                    .wrap(ProblemJson)
                    .wrap(CloseWhileDraining(health.clone()))
                    .wrap(Observe)
                    .app_data(gateway.clone())
                    .app_data(web::Data::new(client))
                    .configure(configure_health(service.clone(), health.clone()));
                // Real resources, so metrics label proxied requests by route, not `unmatched`.
                for route in &routes {
                    app = app.service(PrefixRoute(Rc::new(Route::clone(route))));
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
        Ok(Self { port, admin_port, server, admin, health, background, shutdown: settings.shutdown })
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
        let result = serve_until_stopped(self.server, self.health, self.background, &self.shutdown).await;
        admin.stop(true).await;
        let _ = admin_task.await;
        result
    }
}

/// Per upstream: DNS discovery when a URL names a host, and active health checks.
fn background_work(upstreams: &[Arc<Upstream>], dns_refresh: Duration) -> BackgroundTasks {
    let mut background = BackgroundTasks::new();
    for upstream in upstreams {
        if upstream.is_discovered() {
            let upstream = upstream.clone();
            background.every(
                "upstream-discovery",
                move || dns_refresh,
                move || {
                    let upstream = upstream.clone();
                    async move { upstream.discover().await }
                },
            );
        }
        if upstream.health_check().is_some() {
            let (probing, upstream) = (upstream.clone(), upstream.clone());
            background.every(
                "upstream-health-check",
                move || probing.health_check().map_or(Duration::from_secs(1), |check| check.next_interval()),
                move || {
                    let upstream = upstream.clone();
                    async move { upstream.check_health().await }
                },
            );
        }
    }
    background
}

fn describe_metrics() {
    let counters = [
        (
            "gateway_upstream_requests_total",
            "Requests sent upstream, by upstream and outcome (status code, connect_error, timeout, shed, ...).",
        ),
        ("gateway_upstream_retries_total", "Attempts sent again, by reason (not_sent, connection_lost, unavailable)."),
        ("gateway_retry_budget_exhausted_total", "Retries not sent because the upstream's retry budget was spent."),
        ("gateway_endpoint_requests_total", "Attempts at each endpoint, by outcome (status class or failure kind)."),
        ("gateway_endpoint_ejections_total", "Times outlier detection took an endpoint out of rotation, by reason."),
        ("gateway_ratelimit_decisions_total", "Rate-limit decisions by key id; *_local when Redis could not be asked."),
        ("gateway_auth_failures_total", "Requests refused for a missing, malformed or unknown API key."),
        ("gateway_ratelimit_redis_errors_total", "Rate-limit Redis commands that failed or timed out."),
    ];
    for (name, help) in counters {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_histogram!(
        "gateway_upstream_duration_seconds",
        metrics::Unit::Seconds,
        "Time from the first attempt to the upstream's response head, retries included."
    );
    metrics::describe_histogram!(
        "gateway_endpoint_duration_seconds",
        metrics::Unit::Seconds,
        "Time from sending an attempt to an endpoint to its response head (or failure)."
    );
    let gauges = [
        ("gateway_circuit_state", "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open."),
        ("gateway_upstream_endpoints", "Endpoints of each upstream, in_rotation or out_of_rotation."),
        ("gateway_upstream_panic", "1 while too few endpoints are in rotation and every endpoint takes requests."),
        ("gateway_retry_budget_available", "Retries the upstream's budget allows right now."),
        ("gateway_endpoint_in_rotation", "1 while the endpoint takes requests: healthy and not ejected."),
        ("gateway_endpoint_healthy", "1 while the endpoint passes its active health check."),
        ("gateway_endpoint_in_flight", "Requests in flight on the endpoint."),
    ];
    for (name, help) in gauges {
        metrics::describe_gauge!(name, help);
    }
}

/// Reported, not critical: a failing data service must not take every gateway replica out
/// of the load balancer.
struct UpstreamsInRotation(Vec<Arc<Upstream>>);

#[async_trait]
impl HealthCheck for UpstreamsInRotation {
    fn name(&self) -> &'static str {
        "upstreams"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Result<(), String> {
        let reports: Vec<_> = self.0.iter().map(|upstream| upstream.rotation_report()).collect();
        if reports.iter().all(Result::is_ok) {
            Ok(())
        } else {
            Err(reports.into_iter().map(|r| r.unwrap_or_else(|e| e)).collect::<Vec<_>>().join("; "))
        }
    }
}
