//! Redis used the way both services need it: as something that helps when it answers and
//! costs nothing when it does not.
//!
//! - Each worker thread shares one pipelined connection checked out of a deadpool-redis
//!   pool. A checkout costs a PING round trip, so doing one per command would double the
//!   latency of every command; after an error the connection goes back to the pool, which
//!   checks it before anyone reuses it.
//! - Every command runs under a short timeout.
//! - After a failure Redis is bypassed for a while ([`Redis::bypassed`]), so an outage adds
//!   no latency; it is tried again on its own afterwards.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::{Pool, Runtime, Timeouts};

pub use deadpool_redis::redis;
use observability::HealthCheck;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RedisError(String);

/// What a [`Redis`] needs to know.
pub struct RedisSettings<'a> {
    pub url: &'a str,
    pub pool_size: usize,
    pub timeout: Duration,
    pub retry_after_failure: Duration,
    /// Counter incremented (with an `operation` label) on every failed command.
    pub error_counter: &'static str,
    /// The `operation`s the caller will run (`ping` is this crate's own): their error
    /// counters start at zero, so that a rate of them exists before the first error.
    pub operations: &'static [&'static str],
}

#[derive(Clone)]
pub struct Redis(Arc<Inner>);

struct Inner {
    id: u64,
    pool: Pool,
    timeout: Duration,
    retry_after_failure: Duration,
    error_counter: &'static str,
    started: Instant,
    /// Milliseconds since `started` before which Redis is not tried.
    bypass_until_ms: AtomicU64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Per [`Redis`] (by id), the connection this thread's requests share.
    static WORKER_CONNECTIONS: RefCell<HashMap<u64, deadpool_redis::Connection>> = RefCell::new(HashMap::new());
}

impl Redis {
    /// Builds the pool; connects lazily.
    pub fn new(settings: &RedisSettings<'_>) -> Result<Self, RedisError> {
        let mut config = deadpool_redis::Config::from_url(settings.url);
        config.pool = Some(deadpool_redis::PoolConfig {
            max_size: settings.pool_size,
            timeouts: Timeouts {
                wait: Some(settings.timeout),
                create: Some(settings.timeout),
                recycle: Some(settings.timeout),
            },
            ..Default::default()
        });
        let pool = config.create_pool(Some(Runtime::Tokio1)).map_err(|e| RedisError(format!("redis url: {e}")))?;
        for operation in settings.operations.iter().chain(&["ping"]) {
            metrics::counter!(settings.error_counter, "operation" => *operation).increment(0);
        }
        Ok(Self(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pool,
            timeout: settings.timeout,
            retry_after_failure: settings.retry_after_failure,
            error_counter: settings.error_counter,
            started: Instant::now(),
            bypass_until_ms: AtomicU64::new(0),
        })))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True within the bypass window that follows a failure: callers skip Redis then.
    pub fn bypassed(&self) -> bool {
        self.now_ms() < self.0.bypass_until_ms.load(Ordering::Relaxed)
    }

    pub fn retry_after_failure(&self) -> Duration {
        self.0.retry_after_failure
    }

    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        let id = self.0.id;
        if let Some(connection) =
            WORKER_CONNECTIONS.with_borrow(|c| c.get(&id).map(|o| MultiplexedConnection::clone(o)))
        {
            return Ok(connection);
        }
        let object = self.0.pool.get().await.map_err(|e| RedisError(e.to_string()))?;
        let connection = MultiplexedConnection::clone(&object);
        WORKER_CONNECTIONS.with_borrow_mut(|c| c.insert(id, object));
        Ok(connection)
    }

    /// Runs one command under the timeout. A failure is logged and counted, returns this
    /// thread's connection to the pool, and opens the bypass window.
    pub async fn run<T>(
        &self,
        operation: &'static str,
        command: impl AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    ) -> Result<T, RedisError> {
        let attempt = async {
            let mut connection = self.connection().await?;
            command(&mut connection).await.map_err(|e| RedisError(e.to_string()))
        };
        let result = match tokio::time::timeout(self.0.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(RedisError(format!("timed out after {} ms", self.0.timeout.as_millis()))),
        };
        if let Err(error) = &result {
            WORKER_CONNECTIONS.with_borrow_mut(|c| c.remove(&self.0.id));
            let window = u64::try_from(self.0.retry_after_failure.as_millis()).unwrap_or(u64::MAX);
            self.0.bypass_until_ms.store(self.now_ms().saturating_add(window), Ordering::Relaxed);
            metrics::counter!(self.0.error_counter, "operation" => operation).increment(1);
            tracing::warn!(operation, %error, "redis unavailable; carrying on without it");
        }
        result
    }

    /// For readiness reports: one PING, whatever the bypass window says.
    pub async fn ping(&self) -> Result<(), RedisError> {
        self.run("ping", async |c| redis::cmd("PING").query_async::<String>(c).await.map(drop)).await
    }

    /// (max, open, idle) connections of the pool.
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let status = self.0.pool.status();
        (status.max_size, status.size, status.available)
    }
}

/// `/ready` report of Redis: reported, never critical, since every user of this crate keeps
/// working without Redis.
pub struct RedisCheck(pub Redis);

#[async_trait::async_trait]
impl HealthCheck for RedisCheck {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn check(&self) -> Result<(), String> {
        self.0.ping().await.map_err(|e| e.to_string())
    }
}
