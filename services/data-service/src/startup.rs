//! Building and running the service: `Application::build` binds (port 0 works: tests read
//! the real port back) and `run_until_stopped` serves until a signal drains it.

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use observability::health::configure_health;
use observability::metrics::{Metrics, configure_metrics};
use observability::shutdown::{ShutdownSettings, serve_until_stopped};
use observability::{BackgroundTasks, CloseWhileDraining, HealthCheck, HealthRegistry, Observe, ServiceInfo, server};
use problem::{Problem, ProblemJson};
use redis_access::RedisCheck;

use crate::cache::{self, Cache};
use crate::configuration::Settings;
use crate::db::{self, PostgresCheck};
use crate::items::repository::Repository;
use crate::items::routes::{self, ItemsState};
use crate::openapi;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Database(#[from] db::DbError),
    #[error("cache: {0}")]
    Cache(#[from] cache::CacheError),
    #[error(transparent)]
    Metrics(#[from] observability::metrics::MetricsError),
    #[error(transparent)]
    Listen(#[from] server::ListenError),
}

pub struct Application {
    port: u16,
    server: Server,
    health: HealthRegistry,
    background: BackgroundTasks,
    shutdown: ShutdownSettings,
}

impl Application {
    pub async fn build(settings: Settings, service: ServiceInfo) -> Result<Self, StartupError> {
        if settings.database.create_database {
            db::create_database_if_missing(&settings.database).await?;
        }
        if settings.database.migrate_on_start {
            db::migrate(&settings.database).await?;
        }
        // First: what follows registers metrics, which need the recorder.
        let metrics = Metrics::install(&service)?;
        let pools = db::Pools::new(&settings.database, settings.server.worker_count())?;
        let cache = Cache::new(&settings.cache)?;
        let metrics = metrics
            .with_collector({
                let pools = pools.clone();
                move || pools.record_metrics()
            })
            .with_collector({
                let cache = cache.clone();
                move || cache.record_pool_metrics()
            });
        db::describe_metrics();
        cache::describe_metrics();
        metrics::describe_counter!(
            "idempotent_replays_total",
            "Keyed POSTs answered with their stored first response."
        );
        metrics::counter!("idempotent_replays_total").increment(0);
        let checks: Vec<Arc<dyn HealthCheck>> =
            vec![Arc::new(PostgresCheck(pools.background().clone())), Arc::new(RedisCheck(cache.redis().clone()))];
        let health = HealthRegistry::new(&settings.health, checks);

        let background = background_work(
            Repository::new(pools.background().clone()),
            &cache,
            settings.idempotency.purge_interval_secs,
        );
        let idempotency_ttl_secs = settings.idempotency.ttl_secs;
        let body_limit = settings.items.body_limit_bytes;

        let (listener, port) = server::bind(&settings.server.address())?;
        let server = HttpServer::new({
            let health = health.clone();
            move || {
                // Built on the worker that serves with it: see `db::Pools`.
                let repository = Repository::new(pools.for_worker());
                let items = ItemsState { repository, cache: cache.clone(), idempotency_ttl_secs };
                App::new()
                    .wrap(ProblemJson)
                    .wrap(CloseWhileDraining(health.clone()))
                    .wrap(Observe)
                    .app_data(web::Data::new(items))
                    .app_data(web::PayloadConfig::new(body_limit))
                    .configure(configure_health(service.clone(), health.clone()))
                    .configure(configure_metrics(metrics.clone()))
                    .configure(openapi::configure)
                    .configure(routes::configure)
                    .default_service(web::to(|| async { Problem::not_found("no route matches this path") }))
            }
        });
        let server = server::configure(server, &settings.server, &settings.shutdown)
            .listen(listener)
            .map_err(|source| server::ListenError { address: settings.server.address(), source })?
            .run();
        tracing::info!(port, "data service listening");
        Ok(Self { port, server, health, background, shutdown: settings.shutdown })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        serve_until_stopped(self.server, self.health, self.background, &self.shutdown).await
    }
}

/// Retries cache updates that failed (and once more at shutdown, so that a restart leaves
/// no replica serving an entry older than a write it acknowledged), and purges expired
/// idempotency records.
fn background_work(repository: Repository, cache: &Cache, purge_interval_secs: u64) -> BackgroundTasks {
    let mut background = BackgroundTasks::new();
    let (retrying, period) = (cache.clone(), cache.retry_interval());
    background.every_and_at_stop(
        "cache-retry",
        move || period,
        move || {
            let retrying = retrying.clone();
            async move { retrying.retry_pending().await }
        },
    );
    background.every(
        "purge-idempotency-keys",
        move || Duration::from_secs(purge_interval_secs.max(1)),
        move || {
            let repository = repository.clone();
            async move {
                match repository.purge_expired_keys().await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "purged expired idempotency keys"),
                    Err(error) => tracing::warn!(%error, "could not purge expired idempotency keys"),
                }
            }
        },
    );
    background
}
