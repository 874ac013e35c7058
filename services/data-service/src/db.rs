//! Postgres: the pools, database creation, migrations under an advisory lock, the readiness
//! check, pool metrics, and the classification of database errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use observability::HealthCheck;
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::configuration::DatabaseSettings;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Any constant works as long as every replica uses the same one.
const MIGRATION_LOCK_ID: i64 = 0x5374_6163_6b6c_696e; // "Stacklin"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached or is not accepting work right now: 503, retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a bug or a broken invariant, 500.
    #[error("database error: {0}")]
    Failed(String),
}

impl From<PoolError> for DbError {
    fn from(error: PoolError) -> Self {
        match error {
            PoolError::Backend(e) => e.into(),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> Self {
        let unavailable = match error.code() {
            // No SQLSTATE: the connection broke or could not be made.
            None => true,
            Some(code) => {
                code.code().starts_with("08") // connection exception
                    || code.code().starts_with("57P") // admin/crash shutdown, cannot connect now
                    || *code == SqlState::TOO_MANY_CONNECTIONS
                    || *code == SqlState::QUERY_CANCELED // statement timeout
            }
        };
        // The server's own message and SQLSTATE; the driver's Display says only "db error".
        let text = match error.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => error.to_string(),
        };
        if unavailable { Self::Unavailable(text) } else { Self::Failed(text) }
    }
}

fn pg_config(settings: &DatabaseSettings) -> Result<tokio_postgres::Config, DbError> {
    let mut config: tokio_postgres::Config = settings
        .url
        .expose_secret()
        .parse()
        .map_err(|e| DbError::Failed(format!("database.url is not a valid Postgres URL: {e}")))?;
    if !settings.password_file.is_empty() {
        let password = std::fs::read_to_string(&settings.password_file).map_err(|e| {
            DbError::Failed(format!("cannot read database.password_file {}: {e}", settings.password_file))
        })?;
        config.password(password.trim_end_matches(['\r', '\n']));
    }
    config
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .options(format!("-c statement_timeout={}", settings.statement_timeout_ms))
        .application_name("data-service");
    Ok(config)
}

/// Connections for background work and readiness checks, on the main runtime.
const BACKGROUND_POOL_SIZE: usize = 2;

/// The process's Postgres pools: one per server worker, and one for the work beside the
/// server (background tasks, readiness checks).
///
/// A worker only ever uses its own pool, so its connections are opened and driven on its own
/// runtime: a query costs no wake-up of another thread, and a worker that stops at the end
/// of a drain takes only its own connections with it. (With one pool shared by every worker,
/// a connection opened by one worker and driven by its runtime died when that worker
/// stopped, under a request still running on another worker.) `database.pool_size` is
/// shared out among the workers.
#[derive(Clone)]
pub struct Pools {
    workers: Arc<Vec<Pool>>,
    next: Arc<AtomicUsize>,
    background: Pool,
}

impl Pools {
    pub fn new(settings: &DatabaseSettings, workers: usize) -> Result<Self, DbError> {
        let workers = workers.max(1);
        let per_worker = settings.pool_size.div_ceil(workers).max(1);
        Ok(Self {
            workers: Arc::new((0..workers).map(|_| create_pool(settings, per_worker)).collect::<Result<_, _>>()?),
            next: Arc::new(AtomicUsize::new(0)),
            background: create_pool(settings, BACKGROUND_POOL_SIZE)?,
        })
    }

    /// The pool of the worker that calls this (once, when it builds its app).
    pub fn for_worker(&self) -> Pool {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        self.workers[index].clone()
    }

    /// For work outside the server's workers.
    pub fn background(&self) -> &Pool {
        &self.background
    }

    /// Refreshes the pool gauges, summed over every pool; called right before each scrape.
    pub fn record_metrics(&self) {
        let (mut max, mut open, mut idle, mut waiting) = (0, 0, 0, 0);
        for pool in self.workers.iter().chain([&self.background]) {
            let status = pool.status();
            max += status.max_size;
            open += status.size;
            idle += status.available;
            waiting += status.waiting;
        }
        metrics::gauge!("db_pool_connections", "state" => "max").set(max as f64);
        metrics::gauge!("db_pool_connections", "state" => "open").set(open as f64);
        metrics::gauge!("db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("db_pool_waiting").set(waiting as f64);
    }
}

/// A pool of `size` with explicit bounds and timeouts (deadpool waits forever by default)
/// that checks each connection with a round trip before handing it out, so a connection that
/// died with a database restart is replaced instead of failing a request.
fn create_pool(settings: &DatabaseSettings, size: usize) -> Result<Pool, DbError> {
    let manager = Manager::from_config(
        pg_config(settings)?,
        NoTls,
        ManagerConfig { recycling_method: RecyclingMethod::Verified },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_millis(settings.wait_timeout_ms)))
        .create_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .recycle_timeout(Some(Duration::from_millis(settings.recycle_timeout_ms)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Failed(format!("cannot build the database pool: {e}")))
}

async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, DbError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "migration connection closed with an error");
        }
    });
    Ok(client)
}

/// Creates the configured database when it does not exist (local development).
pub async fn create_database_if_missing(settings: &DatabaseSettings) -> Result<(), DbError> {
    let config = pg_config(settings)?;
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    let mut admin = config.clone();
    admin.dbname("postgres");
    let client = connect(&admin).await?;
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        match client.batch_execute(&format!("CREATE DATABASE \"{quoted}\"")).await {
            Ok(()) => tracing::info!(database = %name, "created the database"),
            // Another replica created it in between: fine.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Applies the embedded migrations. Replicas starting together queue on a session advisory
/// lock, so exactly one applies each migration and the others find nothing left to do.
pub async fn migrate(settings: &DatabaseSettings) -> Result<usize, DbError> {
    migrate_to(settings, refinery::Target::Latest).await
}

/// [`migrate`], up to `target` (a migration's data backfill is tested from the version before).
pub async fn migrate_to(settings: &DatabaseSettings, target: refinery::Target) -> Result<usize, DbError> {
    let mut client = connect(&pg_config(settings)?).await?;
    // A backfill of a large table may take longer than any request should.
    client.batch_execute("SET statement_timeout = 0").await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_ID]).await?;
    let report = embedded::migrations::runner().set_target(target).run_async(&mut client).await;
    // Unlocking explicitly; closing the session would release it too.
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_ID]).await?;
    let report = report.map_err(|e| DbError::Failed(format!("migration failed: {}", with_causes(&e))))?;
    for migration in report.applied_migrations() {
        tracing::info!(version = migration.version(), name = migration.name(), "applied migration");
    }
    Ok(report.applied_migrations().len())
}

/// An error and the errors under it: refinery's own message ends in "db error", and the
/// reason is Postgres's message below it.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    message
}

/// Records how long one query (or transaction) took, by operation, when dropped.
pub struct QueryTimer {
    operation: &'static str,
    started: Instant,
}

impl QueryTimer {
    pub fn start(operation: &'static str) -> Self {
        Self { operation, started: Instant::now() }
    }
}

impl Drop for QueryTimer {
    fn drop(&mut self) {
        metrics::histogram!("db_query_duration_seconds", "operation" => self.operation)
            .record(self.started.elapsed().as_secs_f64());
    }
}

pub fn describe_metrics() {
    metrics::describe_histogram!(
        "db_query_duration_seconds",
        metrics::Unit::Seconds,
        "Time spent in Postgres per operation, including waiting for a pooled connection."
    );
    metrics::describe_gauge!("db_pool_connections", "Postgres pool connections: max, open, idle.");
    metrics::describe_gauge!("db_pool_waiting", "Requests waiting for a pooled Postgres connection.");
}

/// `/ready`: a pooled `SELECT 1`. Critical: without Postgres no request can succeed.
pub struct PostgresCheck(pub Pool);

#[async_trait]
impl HealthCheck for PostgresCheck {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn critical(&self) -> bool {
        true
    }

    async fn check(&self) -> Result<(), String> {
        let client = self.0.get().await.map_err(|e| DbError::from(e).to_string())?;
        client.simple_query("SELECT 1").await.map(drop).map_err(|e| DbError::from(e).to_string())
    }
}
