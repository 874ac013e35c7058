//! Per-key rate limits shared by every gateway replica.
//!
//! The limit is GCRA (a leaky bucket without a background refill), kept in Redis and
//! evaluated by one Lua script with Redis's own clock, so all replicas draw from one bucket
//! per key. If Redis cannot answer and `fail_open` is set, each replica enforces the key's
//! limit on its own (governor) and keeps serving; with `fail_open` off it answers 503.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter as LocalLimiter, clock::DefaultClock, state::InMemoryState, state::NotKeyed};
use redis_access::redis::Script;
use redis_access::{Redis, RedisError, RedisSettings};
use secrecy::ExposeSecret;

use crate::auth::Client;
use crate::configuration::RateLimitSettings;

/// `KEYS[1]`: the key's theoretical arrival time (µs). `ARGV[1]`: µs per request,
/// `ARGV[2]`: burst. Returns {allowed, retry after µs, µs until the bucket is full}.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new_tat = tat + interval
if new_tat - tolerance > now then
  return {0, new_tat - tolerance - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, new_tat - now}
";

/// The outcome for one request, with what the `RateLimit-*` headers report.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub allowed: bool,
    /// Requests a full bucket holds (the burst).
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// When refused: seconds until a request would be allowed.
    pub retry_after_secs: u64,
    /// Decided by this replica alone because Redis could not be asked.
    pub local: bool,
}

type Local = LocalLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

pub struct RateLimiter {
    redis: Redis,
    prefix: String,
    fail_open: bool,
    script: Script,
    local: Mutex<HashMap<Arc<str>, Arc<Local>>>,
}

impl RateLimiter {
    pub fn new(settings: &RateLimitSettings) -> Result<Self, RedisError> {
        let redis = Redis::new(&RedisSettings {
            url: settings.redis_url.expose_secret(),
            pool_size: 16,
            timeout: Duration::from_millis(settings.timeout_ms),
            retry_after_failure: Duration::from_millis(settings.retry_after_failure_ms),
            error_counter: "gateway_ratelimit_redis_errors_total",
        })?;
        Ok(Self {
            redis,
            prefix: settings.key_prefix.clone(),
            fail_open: settings.fail_open,
            script: Script::new(GCRA),
            local: Mutex::new(HashMap::new()),
        })
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// `None`: Redis is unavailable and `fail_open` is off.
    pub async fn check(&self, client: &Client) -> Option<Decision> {
        let decision = match self.shared(client).await {
            Some(decision) => decision,
            None if self.fail_open => self.local(client),
            None => return None,
        };
        let label = match (decision.allowed, decision.local) {
            (true, false) => "allowed",
            (false, false) => "limited",
            (true, true) => "allowed_local",
            (false, true) => "limited_local",
        };
        metrics::counter!("gateway_ratelimit_decisions_total", "key_id" => client.key_id.to_string(), "decision" => label)
            .increment(1);
        Some(decision)
    }

    async fn shared(&self, client: &Client) -> Option<Decision> {
        if self.redis.bypassed() {
            return None;
        }
        let key = format!("{}{}", self.prefix, client.key_id);
        let interval_us = (1_000_000 / u64::from(client.rate_per_sec)).max(1);
        let script = &self.script;
        let reply: (i64, i64, i64) = self
            .redis
            .run("ratelimit", async |c| script.key(&key).arg(interval_us).arg(client.burst).invoke_async(c).await)
            .await
            .ok()?;
        let (allowed, retry_after_us, used_us) = reply;
        let used_us = u64::try_from(used_us).unwrap_or(0);
        let capacity_us = interval_us * u64::from(client.burst);
        Some(Decision {
            allowed: allowed == 1,
            limit: client.burst,
            remaining: u32::try_from(capacity_us.saturating_sub(used_us) / interval_us).unwrap_or(0),
            reset_secs: used_us.div_ceil(1_000_000),
            retry_after_secs: u64::try_from(retry_after_us).unwrap_or(0).div_ceil(1_000_000).max(1),
            local: false,
        })
    }

    fn local(&self, client: &Client) -> Decision {
        let limiter = {
            let mut limiters = self.local.lock().unwrap_or_else(|e| e.into_inner());
            limiters
                .entry(client.key_id.clone())
                .or_insert_with(|| {
                    let rate = NonZeroU32::new(client.rate_per_sec).unwrap_or(NonZeroU32::MIN);
                    let burst = NonZeroU32::new(client.burst).unwrap_or(NonZeroU32::MIN);
                    Arc::new(LocalLimiter::direct(Quota::per_second(rate).allow_burst(burst)).with_middleware())
                })
                .clone()
        };
        let per_request_us = 1_000_000 / u64::from(client.rate_per_sec.max(1));
        match limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit: client.burst,
                    remaining,
                    reset_secs: (u64::from(client.burst - remaining.min(client.burst)) * per_request_us)
                        .div_ceil(1_000_000),
                    retry_after_secs: 0,
                    local: true,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&DefaultClock::default()));
                Decision {
                    allowed: false,
                    limit: client.burst,
                    remaining: 0,
                    reset_secs: (u64::from(client.burst) * per_request_us).div_ceil(1_000_000),
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                    local: true,
                }
            }
        }
    }
}
