//! The Redis read cache for single items.
//!
//! Entries are `<version>|<item JSON>`; a deleted item leaves a tombstone `<version>|` with
//! an empty body. Every write goes through one Lua script that stores an entry only when its
//! version is newer than the cached one, so the cache never moves backwards: a reader that
//! fetched version 1 from Postgres cannot overwrite version 2 written meanwhile, and a late
//! fill cannot resurrect a deleted item.
//!
//! Redis is optional (see `redis_access`: short timeouts, failures counted, a bypass window
//! after a failure so an outage costs no latency). A write whose cache update fails leaves
//! the item "pending": reads of it skip the cache, and a background task retries the update
//! until it lands, so this replica never serves the old version from the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_access::redis::{AsyncCommands, Script};
use redis_access::{Redis, RedisError, RedisSettings};
use secrecy::ExposeSecret;
use uuid::Uuid;

use crate::configuration::CacheSettings;

/// Stores `ARGV[2]` under `KEYS[1]` as `ARGV[1]|ARGV[2]` (TTL `ARGV[3]` ms) unless the cached
/// version is already at least `ARGV[1]`.
const PUT_IF_NEWER: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+)|'))
  if version and version >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
";

/// What the cache knows about an item.
pub enum Lookup {
    Item {
        version: i32,
        body: Vec<u8>,
    },
    Deleted,
    /// Not cached, or the cache cannot be asked right now.
    Unknown,
}

/// One cache update still to apply; `body` is `None` for a deletion.
#[derive(Clone)]
struct Pending {
    version: i32,
    body: Option<Vec<u8>>,
}

#[derive(Clone)]
pub struct Cache(Arc<Inner>);

struct Inner {
    redis: Redis,
    prefix: String,
    ttl_ms: u64,
    pending: Mutex<HashMap<Uuid, Pending>>,
    put_if_newer: Script,
}

pub type CacheError = RedisError;

impl Cache {
    pub fn new(settings: &CacheSettings) -> Result<Self, CacheError> {
        let redis = Redis::new(&RedisSettings {
            url: settings.url.expose_secret(),
            pool_size: settings.pool_size,
            timeout: Duration::from_millis(settings.timeout_ms),
            retry_after_failure: Duration::from_millis(settings.retry_after_failure_ms),
            error_counter: "cache_errors_total",
            operations: &["get", "put"],
        })?;
        metrics::counter!("cache_hits_total").increment(0);
        metrics::counter!("cache_misses_total").increment(0);
        Ok(Self(Arc::new(Inner {
            redis,
            prefix: settings.key_prefix.clone(),
            ttl_ms: settings.ttl_secs * 1000,
            pending: Mutex::new(HashMap::new()),
            put_if_newer: Script::new(PUT_IF_NEWER),
        })))
    }

    pub fn redis(&self) -> &Redis {
        &self.0.redis
    }

    fn key(&self, id: Uuid) -> String {
        format!("{}item:{}", self.0.prefix, id.as_hyphenated())
    }

    fn bypassed(&self) -> bool {
        self.0.redis.bypassed()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Pending>> {
        self.0.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn get(&self, id: Uuid) -> Lookup {
        if self.bypassed() || self.pending().contains_key(&id) {
            return Lookup::Unknown;
        }
        let key = self.key(id);
        let Ok(value) = self.0.redis.run("get", async |c| c.get::<_, Option<Vec<u8>>>(&key).await).await else {
            return Lookup::Unknown;
        };
        let lookup = value.as_deref().and_then(parse_entry);
        match lookup {
            Some(lookup) => {
                metrics::counter!("cache_hits_total").increment(1);
                lookup
            }
            None => {
                metrics::counter!("cache_misses_total").increment(1);
                Lookup::Unknown
            }
        }
    }

    /// Caches what a read found in Postgres. Best effort: a failure only costs a later miss.
    pub async fn fill(&self, id: Uuid, version: i32, body: Vec<u8>) {
        if self.bypassed() {
            return;
        }
        let _ = self.put(id, &Pending { version, body: Some(body) }).await;
    }

    /// Records a committed change (`body` `None` = deleted). If Redis cannot take it now, the
    /// item stays pending until [`Cache::retry_pending`] succeeds.
    pub async fn record_write(&self, id: Uuid, version: i32, body: Option<Vec<u8>>) {
        let update = Pending { version, body };
        if self.bypassed() || self.put(id, &update).await.is_err() {
            let mut pending = self.pending();
            let newer = pending.get(&id).is_none_or(|p| p.version < update.version);
            if newer {
                pending.insert(id, update);
            }
        }
    }

    async fn put(&self, id: Uuid, update: &Pending) -> Result<(), CacheError> {
        let key = self.key(id);
        // A tombstone outranks the last version the item had.
        let version = if update.body.is_some() { update.version } else { update.version + 1 };
        let body: &[u8] = update.body.as_deref().unwrap_or_default();
        let ttl_ms = self.0.ttl_ms;
        let script = &self.0.put_if_newer;
        self.0
            .redis
            .run("put", async |c| {
                script.key(&key).arg(version).arg(body).arg(ttl_ms).invoke_async::<i32>(c).await.map(drop)
            })
            .await
    }

    /// Applies the updates that failed earlier; run periodically.
    pub async fn retry_pending(&self) {
        if self.bypassed() {
            return;
        }
        let updates: Vec<(Uuid, Pending)> = self.pending().iter().map(|(id, p)| (*id, p.clone())).collect();
        for (id, update) in updates {
            if self.put(id, &update).await.is_err() {
                return;
            }
            let mut pending = self.pending();
            // Only clear it if no newer write arrived meanwhile.
            if pending.get(&id).is_some_and(|p| p.version == update.version) {
                pending.remove(&id);
            }
        }
    }

    pub fn retry_interval(&self) -> Duration {
        self.0.redis.retry_after_failure().max(Duration::from_millis(100))
    }

    pub fn record_pool_metrics(&self) {
        let (max, open, idle) = self.0.redis.pool_status();
        metrics::gauge!("cache_pool_connections", "state" => "max").set(max as f64);
        metrics::gauge!("cache_pool_connections", "state" => "open").set(open as f64);
        metrics::gauge!("cache_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("cache_pending_updates").set(self.pending().len() as f64);
    }
}

fn parse_entry(value: &[u8]) -> Option<Lookup> {
    let separator = value.iter().position(|&b| b == b'|')?;
    let version = std::str::from_utf8(&value[..separator]).ok()?.parse().ok()?;
    let body = &value[separator + 1..];
    Some(if body.is_empty() { Lookup::Deleted } else { Lookup::Item { version, body: body.to_vec() } })
}

pub fn describe_metrics() {
    metrics::describe_counter!("cache_hits_total", "Item reads answered from Redis.");
    metrics::describe_counter!("cache_misses_total", "Item reads Redis could not answer (then served from Postgres).");
    metrics::describe_counter!("cache_errors_total", "Redis operations that failed or timed out, by operation.");
    metrics::describe_gauge!("cache_pool_connections", "Redis pool connections: max, open, idle.");
    metrics::describe_gauge!("cache_pending_updates", "Committed writes whose cache update is still to be applied.");
}
