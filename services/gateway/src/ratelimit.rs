//! Per-key rate limits shared by every gateway replica.
//!
//! The limit is GCRA (a leaky bucket without a background refill), kept in Redis and
//! evaluated by one Lua script with Redis's own clock, so all replicas draw from one bucket
//! per key. For fast keys a replica reserves a few requests per call (a reservation, see
//! [`reservation_size`]) instead of one, so Redis is not asked on every request: one request per
//! key and replica asks at a time while the others wait for its answer, and a reservation running
//! low is topped up in the background before it runs out. A refusal is remembered until the
//! moment Redis named, so a client over its limit costs no Redis call per request. If Redis
//! cannot answer and `fail_open` is set, each replica enforces the key's limit on its own
//! (governor) and keeps serving; with `fail_open` off it answers 503.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::middleware::StateInformationMiddleware;
use governor::{Quota, RateLimiter as LocalLimiter, clock::DefaultClock, state::InMemoryState, state::NotKeyed};
use metrics::Counter;
use redis_access::redis::Script;
use redis_access::{Redis, RedisError, RedisSettings};
use secrecy::ExposeSecret;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

use crate::auth::Caller;
use crate::configuration::RateLimitSettings;

/// `KEYS[1]`: the key's theoretical arrival time (µs). `ARGV[1]`: µs per request,
/// `ARGV[2]`: burst, `ARGV[3]`: how many requests to reserve at most. Takes as many as the
/// bucket holds, up to that. Returns {granted, retry after µs, µs until the bucket is full}.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local available = math.floor((now + tolerance - tat) / interval)
if available < 1 then
  return {0, tat + interval - tolerance - now, tat - now}
end
local granted = math.min(available, wanted)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {granted, 0, new_tat - now}
";

/// Reserved requests a replica may still admit without asking Redis. They were taken from
/// the shared bucket when reserved, so reservations never let the replicas together exceed the
/// limit; an unused reservation expires, which at worst admits a little less.
struct Reservation {
    tokens: u32,
    expires: Instant,
    /// What Redis said when granting it, for the `RateLimit-*` headers.
    remaining_after: u32,
    reset_secs: u64,
}

impl Reservation {
    /// The decision for a request admitted from this reservation.
    fn decision(&self, caller: &Caller) -> Decision {
        Decision {
            allowed: true,
            limit: caller.burst,
            remaining: self.remaining_after + self.tokens,
            reset_secs: self.reset_secs,
            retry_after_secs: 0,
            local: false,
        }
    }
}

/// Redis's last refusal for a key: nothing is admitted before `until`, whichever replica
/// asks, since the bucket only drains at its fixed rate.
struct Refusal {
    until: Instant,
    reset_secs: u64,
}

/// What this replica knows about one key's shared bucket.
#[derive(Default)]
struct KeyState {
    reservation: Option<Reservation>,
    refusal: Option<Refusal>,
    /// Held by whoever is asking Redis for this key, so one request asks at a time.
    asking: Arc<AsyncMutex<()>>,
}

/// How long a reservation stays usable.
const RESERVATION_LIFETIME: Duration = Duration::from_millis(250);

/// Requests reserved per Redis call: about 1/50 of the per-second rate (so a reservation lasts
/// about 20 ms at full rate), never more than a tenth of the burst, between 1 and 1,000.
/// Slow keys (under 50 requests a second) are decided request by request; for the fastest,
/// a Redis call (tens of microseconds of CPU on each side) is spread over 1,000 requests.
fn reservation_size(caller: &Caller) -> u32 {
    (caller.rate_per_sec / 50).min(caller.burst / 10).clamp(1, 1000)
}

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

impl Decision {
    fn refused(caller: &Caller, refusal: &Refusal, now: Instant) -> Self {
        Self {
            allowed: false,
            limit: caller.burst,
            remaining: 0,
            reset_secs: refusal.reset_secs,
            retry_after_secs: refusal.until.saturating_duration_since(now).as_micros().div_ceil(1_000_000).max(1)
                as u64,
            local: false,
        }
    }
}

type Local = LocalLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

pub struct RateLimiter {
    buckets: Arc<SharedBuckets>,
    fail_open: bool,
}

/// The Redis side of the limits, with this replica's reservations and remembered refusals.
struct SharedBuckets {
    redis: Redis,
    prefix: String,
    script: Script,
    /// Built at start from the configured keys, never changed: looked up without a lock.
    keys: HashMap<Arc<str>, KeyEntry>,
}

struct KeyEntry {
    state: Mutex<KeyState>,
    /// This replica's own limiter for the key, used while Redis cannot be asked.
    local: Local,
    /// `gateway_ratelimit_decisions_total` of the key, by [`DECISIONS`].
    decisions: [Counter; 4],
}

/// The `decision` label: allowed, limited, and the same decided locally.
const DECISIONS: [&str; 4] = ["allowed", "limited", "allowed_local", "limited_local"];

impl KeyEntry {
    fn new(caller: &Caller) -> Self {
        let key_id = &*caller.key_id;
        let rate = NonZeroU32::new(caller.rate_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(caller.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            state: Mutex::new(KeyState::default()),
            local: LocalLimiter::direct(Quota::per_second(rate).allow_burst(burst)).with_middleware(),
            decisions: DECISIONS.map(|decision| {
                metrics::counter!("gateway_ratelimit_decisions_total", "key_id" => key_id.to_owned(), "decision" => decision)
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, KeyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What this replica can decide for a request without asking Redis.
enum Known {
    Decided(Decision),
    /// Nothing reserved and no refusal in force: the holder of this lock asks Redis.
    Unknown(Arc<AsyncMutex<()>>),
}

impl RateLimiter {
    pub fn new<'a>(
        settings: &RateLimitSettings,
        callers: impl Iterator<Item = &'a Caller>,
    ) -> Result<Self, RedisError> {
        let redis = Redis::new(&RedisSettings {
            url: settings.redis_url.expose_secret(),
            pool_size: 16,
            timeout: Duration::from_millis(settings.timeout_ms),
            retry_after_failure: Duration::from_millis(settings.retry_after_failure_ms),
            error_counter: "gateway_ratelimit_redis_errors_total",
            operations: &["ratelimit"],
        })?;
        Ok(Self {
            buckets: Arc::new(SharedBuckets {
                redis,
                prefix: settings.key_prefix.clone(),
                script: Script::new(GCRA),
                keys: callers.map(|caller| (caller.key_id.clone(), KeyEntry::new(caller))).collect(),
            }),
            fail_open: settings.fail_open,
        })
    }

    pub fn redis(&self) -> &Redis {
        &self.buckets.redis
    }

    /// `None`: Redis is unavailable and `fail_open` is off (or `caller` is not a configured key).
    pub async fn check(&self, caller: &Caller) -> Option<Decision> {
        // Clients come from the configured keys, and every configured key has an entry.
        let entry = self.buckets.keys.get(&caller.key_id)?;
        let decision = match self.shared(entry, caller).await {
            Some(decision) => decision,
            None if self.fail_open => local_decision(&entry.local, caller),
            None => return None,
        };
        entry.decisions[usize::from(!decision.allowed) + 2 * usize::from(decision.local)].increment(1);
        Some(decision)
    }

    async fn shared(&self, entry: &KeyEntry, caller: &Caller) -> Option<Decision> {
        let asking = match self.buckets.known(entry, caller) {
            Known::Decided(decision) => return Some(decision),
            Known::Unknown(asking) => asking,
        };
        if self.buckets.redis.bypassed() {
            return None;
        }
        let _turn = asking.lock().await;
        // Whoever asked before this request may have left tokens or a refusal.
        if let Known::Decided(decision) = self.buckets.known(entry, caller) {
            return Some(decision);
        }
        // Boxed: the Redis call's future is about 6 KiB, and inline it would be part of every
        // request's future (moved into place and touched on each request) for a call made
        // once per reservation.
        Box::pin(self.buckets.ask(entry, caller, reservation_size(caller), true)).await
    }
}

impl SharedBuckets {
    /// Takes a reserved token or applies a standing refusal; starts a background top-up when
    /// the reservation runs low and nobody is asking Redis for this key yet.
    fn known(self: &Arc<Self>, entry: &KeyEntry, caller: &Caller) -> Known {
        let now = Instant::now();
        let mut state = entry.state();
        if let Some(reservation) = state.reservation.as_mut().filter(|l| l.tokens > 0 && l.expires > now) {
            reservation.tokens -= 1;
            let decision = reservation.decision(caller);
            let size = reservation_size(caller);
            if reservation.tokens < size / 2
                && let Ok(turn) = state.asking.clone().try_lock_owned()
            {
                drop(state);
                self.top_up(caller.clone(), size, turn);
            }
            return Known::Decided(decision);
        }
        match &state.refusal {
            Some(refusal) if refusal.until > now => Known::Decided(Decision::refused(caller, refusal, now)),
            _ => Known::Unknown(state.asking.clone()),
        }
    }

    /// Reserves the next reservation while the current one still lasts, so that requests do not
    /// wait for Redis.
    fn top_up(self: &Arc<Self>, caller: Caller, size: u32, turn: OwnedMutexGuard<()>) {
        if self.redis.bypassed() {
            return;
        }
        let buckets = self.clone();
        actix_web::rt::spawn(async move {
            let _turn = turn;
            if let Some(entry) = buckets.keys.get(&caller.key_id) {
                buckets.ask(entry, &caller, size, false).await;
            }
        });
    }

    /// Asks Redis for up to `wanted` requests and records the answer; with `for_request`,
    /// one granted request is this request's own. `None` when Redis could not answer.
    async fn ask(&self, entry: &KeyEntry, caller: &Caller, wanted: u32, for_request: bool) -> Option<Decision> {
        let key = format!("{}{}", self.prefix, caller.key_id);
        let interval_us = (1_000_000 / u64::from(caller.rate_per_sec)).max(1);
        let script = &self.script;
        let reply: (i64, i64, i64) = self
            .redis
            .run("ratelimit", async |c| {
                script.key(&key).arg(interval_us).arg(caller.burst).arg(wanted).invoke_async(c).await
            })
            .await
            .ok()?;
        let (granted, retry_after_us, used_us) = reply;
        let granted = u32::try_from(granted).unwrap_or(0);
        let used_us = u64::try_from(used_us).unwrap_or(0);
        let capacity_us = interval_us * u64::from(caller.burst);
        let remaining = u32::try_from(capacity_us.saturating_sub(used_us) / interval_us).unwrap_or(0);
        let reset_secs = used_us.div_ceil(1_000_000);
        let now = Instant::now();
        let mut state = entry.state();
        if granted == 0 {
            let refusal =
                Refusal { until: now + Duration::from_micros(u64::try_from(retry_after_us).unwrap_or(0)), reset_secs };
            let decision = Decision::refused(caller, &refusal, now);
            state.refusal = Some(refusal);
            return Some(decision);
        }
        state.refusal = None;
        let own = u32::from(for_request);
        // Tokens of a reservation still valid are kept: each was granted by Redis.
        let kept = state.reservation.as_ref().filter(|l| l.expires > now).map_or(0, |l| l.tokens);
        let reservation = Reservation {
            tokens: kept + granted - own,
            expires: now + RESERVATION_LIFETIME,
            remaining_after: remaining,
            reset_secs,
        };
        let decision = reservation.decision(caller);
        state.reservation = Some(reservation);
        Some(decision)
    }
}

/// The key's limit as this replica alone enforces it.
fn local_decision(limiter: &Local, caller: &Caller) -> Decision {
    let per_request_us = 1_000_000 / u64::from(caller.rate_per_sec.max(1));
    match limiter.check() {
        Ok(snapshot) => {
            let remaining = snapshot.remaining_burst_capacity();
            Decision {
                allowed: true,
                limit: caller.burst,
                remaining,
                reset_secs: (u64::from(caller.burst - remaining.min(caller.burst)) * per_request_us)
                    .div_ceil(1_000_000),
                retry_after_secs: 0,
                local: true,
            }
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&DefaultClock::default()));
            Decision {
                allowed: false,
                limit: caller.burst,
                remaining: 0,
                reset_secs: (u64::from(caller.burst) * per_request_us).div_ceil(1_000_000),
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                local: true,
            }
        }
    }
}
