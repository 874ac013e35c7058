//! Postgres: the pool, database creation, migrations under an advisory lock, the readiness
//! check, pool metrics, and the classification of database errors.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{
    ConfigConnectImpl, Connect, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures_util::future::BoxFuture;
use observability::HealthCheck;
use secrecy::ExposeSecret;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
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

/// A pool with explicit bounds and timeouts (deadpool waits forever by default) that checks
/// each connection with a round trip before handing it out, so a connection that died with
/// a database restart is replaced instead of failing a request.
///
/// Connections are opened and driven on the runtime that calls this (the service's main
/// runtime), see [`DrivenOnMainRuntime`]. Call it from inside that runtime.
pub fn create_pool(settings: &DatabaseSettings) -> Result<Pool, DbError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| DbError::Failed(format!("the database pool needs a Tokio runtime: {e}")))?;
    let manager = Manager::from_connect(
        pg_config(settings)?,
        DrivenOnMainRuntime(runtime),
        ManagerConfig { recycling_method: RecyclingMethod::Verified },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(Some(Duration::from_millis(settings.wait_timeout_ms)))
        .create_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
        .recycle_timeout(Some(Duration::from_millis(settings.recycle_timeout_ms)))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Failed(format!("cannot build the database pool: {e}")))
}

/// Opens each pooled connection on the service's main runtime and drives it there, rather
/// than on the server worker whose request happened to need a new connection.
///
/// Every worker shares the pool, and at the end of a drain each worker stops as soon as its
/// own requests are done, taking the tasks spawned on it along. A connection driven by a
/// worker that has stopped dies under whichever request on another worker is using it (the
/// request then fails with "connection closed"). The main runtime runs until every worker
/// has finished.
struct DrivenOnMainRuntime(tokio::runtime::Handle);

impl Connect for DrivenOnMainRuntime {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>> {
        let (config, fallback) = (pg_config.clone(), pg_config.clone());
        Box::pin(async move {
            let (opened, client) = oneshot::channel();
            // Connected there too: a socket belongs to the runtime that opened it.
            let driver = self.0.spawn(async move {
                match config.connect(NoTls).await {
                    Ok((client, connection)) => {
                        if opened.send(Ok(client)).is_ok()
                            && let Err(error) = connection.await
                        {
                            tracing::warn!(%error, "database connection closed with an error");
                        }
                    }
                    Err(error) => drop(opened.send(Err(error))),
                }
            });
            match client.await {
                Ok(client) => Ok((client?, driver)),
                // The main runtime is shutting down: the process is exiting. Connect here.
                Err(_) => ConfigConnectImpl { tls: NoTls }.connect(&fallback).await,
            }
        })
    }
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
    let mut client = connect(&pg_config(settings)?).await?;
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_ID]).await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    // Unlocking explicitly; closing the session would release it too.
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_ID]).await?;
    let report = report.map_err(|e| DbError::Failed(format!("migration failed: {e}")))?;
    for migration in report.applied_migrations() {
        tracing::info!(version = migration.version(), name = migration.name(), "applied migration");
    }
    Ok(report.applied_migrations().len())
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

/// Refreshes the pool gauges; called right before each scrape.
pub fn record_pool_metrics(pool: &Pool) {
    let status = pool.status();
    metrics::gauge!("db_pool_connections", "state" => "max").set(status.max_size as f64);
    metrics::gauge!("db_pool_connections", "state" => "open").set(status.size as f64);
    metrics::gauge!("db_pool_connections", "state" => "idle").set(status.available as f64);
    metrics::gauge!("db_pool_waiting").set(status.waiting as f64);
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
