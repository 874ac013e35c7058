//! An upstream: its endpoints (round robin; one that refuses a connection is ejected for a
//! while and then tried again by real traffic), its circuit breaker, and the retry budget.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::header::HeaderValue;
use hyper::http::uri::Authority;
use metrics::{Counter, Histogram};
use observability::metrics::HandleCache;

use crate::configuration::ProxySettings;

pub struct Endpoint {
    /// Base URL without a trailing slash.
    pub base: String,
    /// `host:port`, to connect to; shared, as every request's connection lease names it.
    pub address: Arc<str>,
    /// The `Host` header the upstream is sent.
    pub host: HeaderValue,
    /// Path of the base URL (empty, or starting with `/`), put in front of every request path.
    pub path: String,
    /// Milliseconds after the upstream's `epoch` until which the endpoint rests; 0: never
    /// ejected. An atomic, because every request reads it.
    ejected_until_ms: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream url {0:?} must look like http://host[:port][/path]")]
pub struct InvalidUrl(String);

impl Endpoint {
    fn parse(url: &str) -> Result<Self, InvalidUrl> {
        let invalid = || InvalidUrl(url.to_owned());
        let base = url.trim_end_matches('/');
        let rest = base.strip_prefix("http://").ok_or_else(invalid)?;
        let (authority, path) = rest.find('/').map_or((rest, ""), |slash| rest.split_at(slash));
        let parsed = authority.parse::<Authority>().map_err(|_| invalid())?;
        let host = Some(parsed.host()).filter(|h| !h.is_empty() && !authority.contains('@')).ok_or_else(invalid)?;
        let port = match parsed.port_u16() {
            Some(port) => port,
            None if authority.len() == host.len() => 80,
            None => return Err(invalid()),
        };
        if path.contains(['?', '#']) {
            return Err(invalid());
        }
        Ok(Self {
            base: base.to_owned(),
            address: Arc::from(format!("{host}:{port}")),
            host: HeaderValue::from_str(authority).map_err(|_| invalid())?,
            path: path.to_owned(),
            ejected_until_ms: AtomicU64::new(0),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe request is in flight; everyone else is shed.
    HalfOpen,
}

pub struct Upstream {
    pub name: String,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    breaker: Mutex<BreakerState>,
    /// The breaker is closed with no failure counted: the state of nearly every request,
    /// read without taking the lock (which the replica's workers would otherwise contend for
    /// twice per request).
    healthy: AtomicBool,
    /// Origin of the endpoints' ejection times.
    epoch: Instant,
    breaker_failures: u32,
    breaker_open: Duration,
    eject_for: Duration,
    /// Retry tokens, in thousandths: each request deposits `ratio`, each retry costs one.
    retry_tokens_milli: AtomicU64,
    retry_deposit_milli: u64,
    duration: Histogram,
    /// `gateway_upstream_requests_total` by outcome (a status code or a failure kind).
    requests: HandleCache<&'static str, Counter>,
}

/// Permission to send a request through the breaker.
#[derive(Debug)]
pub enum Admission {
    Allowed,
    /// Shed: the breaker is open; retry after this many seconds.
    Shed(u64),
}

const MAX_RETRY_TOKENS_MILLI: u64 = 10_000;

impl Upstream {
    pub fn new(name: &str, urls: &[String], settings: &ProxySettings) -> Result<Self, InvalidUrl> {
        let upstream = Self {
            name: name.to_owned(),
            endpoints: urls.iter().map(|url| Endpoint::parse(url)).collect::<Result<_, _>>()?,
            next: AtomicUsize::new(0),
            breaker: Mutex::new(BreakerState::Closed { failures: 0 }),
            healthy: AtomicBool::new(true),
            epoch: Instant::now(),
            breaker_failures: settings.breaker_failures.max(1),
            breaker_open: Duration::from_secs(settings.breaker_open_secs),
            eject_for: Duration::from_secs(settings.eject_secs),
            retry_tokens_milli: AtomicU64::new(MAX_RETRY_TOKENS_MILLI),
            retry_deposit_milli: (settings.retry_budget_ratio.clamp(0.0, 1.0) * 1000.0) as u64,
            duration: metrics::histogram!("gateway_upstream_duration_seconds", "upstream" => name.to_owned()),
            requests: HandleCache::new(),
        };
        upstream.publish_state(BreakerState::Closed { failures: 0 });
        Ok(upstream)
    }

    /// The next endpoint in turn that is not ejected; if all are, the next in turn anyway
    /// (so an upstream whose endpoints all failed is probed rather than given up on).
    pub fn pick(&self) -> Option<&Endpoint> {
        let count = self.endpoints.len();
        let start = if count > 1 { self.next.fetch_add(1, Ordering::Relaxed) } else { 0 };
        let now_ms = self.millis_since_epoch();
        (0..count)
            .map(|i| &self.endpoints[(start + i) % count])
            .find(|e| e.ejected_until_ms.load(Ordering::Relaxed) <= now_ms)
            .or_else(|| self.endpoints.get(start % count.max(1)))
    }

    fn millis_since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `host:port` of each endpoint, for reachability reports.
    pub fn endpoint_addresses(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.address.to_string()).collect()
    }

    pub fn eject(&self, endpoint: &Endpoint) {
        let rest_ms = u64::try_from(self.eject_for.as_millis()).unwrap_or(u64::MAX);
        endpoint.ejected_until_ms.store(self.millis_since_epoch().saturating_add(rest_ms).max(1), Ordering::Relaxed);
        tracing::warn!(upstream = %self.name, endpoint = %endpoint.base, eject_secs = self.eject_for.as_secs(), "endpoint ejected");
    }

    pub fn admit(&self) -> Admission {
        if self.healthy.load(Ordering::Acquire) {
            return Admission::Allowed;
        }
        let mut state = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            BreakerState::Closed { .. } => Admission::Allowed,
            BreakerState::Open { until } if Instant::now() >= until => {
                *state = BreakerState::HalfOpen;
                self.publish_state(*state);
                Admission::Allowed
            }
            BreakerState::Open { until } => {
                Admission::Shed(until.saturating_duration_since(Instant::now()).as_secs().max(1))
            }
            BreakerState::HalfOpen => Admission::Shed(1),
        }
    }

    /// Records the outcome of an admitted request.
    pub fn record(&self, success: bool) {
        if success && self.healthy.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let next = match (*state, success) {
            (_, true) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, false) if failures + 1 < self.breaker_failures => {
                BreakerState::Closed { failures: failures + 1 }
            }
            (_, false) => BreakerState::Open { until: Instant::now() + self.breaker_open },
        };
        if std::mem::discriminant(&next) != std::mem::discriminant(&*state) {
            tracing::warn!(upstream = %self.name, from = ?*state, to = ?next, "circuit breaker changed state");
            self.publish_state(next);
        }
        *state = next;
        self.healthy.store(next == BreakerState::Closed { failures: 0 }, Ordering::Release);
    }

    fn publish_state(&self, state: BreakerState) {
        let value = match state {
            BreakerState::Closed { .. } => 0.0,
            BreakerState::Open { .. } => 1.0,
            BreakerState::HalfOpen => 2.0,
        };
        metrics::gauge!("gateway_circuit_state", "upstream" => self.name.clone()).set(value);
    }

    /// Counts one forwarded (or shed) request by `outcome`, and how long it took when it was
    /// sent.
    pub fn count(&self, outcome: &'static str, elapsed: Option<Duration>) {
        self.requests
            .get(&outcome, |outcome| {
                metrics::counter!("gateway_upstream_requests_total", "upstream" => self.name.clone(), "status" => *outcome)
            })
            .increment(1);
        if let Some(elapsed) = elapsed {
            self.duration.record(elapsed.as_secs_f64());
        }
    }

    /// Every request adds a fraction of a retry token (up to a cap).
    pub fn deposit_retry_budget(&self) {
        // A full budget (the usual case) is only read: no write for the workers to contend on.
        let _ = self.retry_tokens_milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
            (tokens < MAX_RETRY_TOKENS_MILLI).then(|| (tokens + self.retry_deposit_milli).min(MAX_RETRY_TOKENS_MILLI))
        });
    }

    /// Takes one retry token if there is one: retries can never exceed the budget ratio.
    pub fn withdraw_retry(&self) -> bool {
        self.retry_tokens_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| tokens.checked_sub(1000))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ProxySettings {
        ProxySettings {
            body_limit_bytes: 1024,
            connect_timeout_ms: 100,
            idle_timeout_ms: 100,
            max_retries: 2,
            retry_budget_ratio: 0.5,
            eject_secs: 60,
            breaker_failures: 3,
            breaker_open_secs: 0,
        }
    }

    #[test]
    fn round_robin_skips_ejected_endpoints() {
        let upstream = Upstream::new("u", &["http://a/".to_owned(), "http://b".to_owned()], &settings()).unwrap();
        let first = upstream.pick().unwrap().base.clone();
        let second = upstream.pick().unwrap().base.clone();
        assert_ne!(first, second);
        assert_eq!(first, "http://a");
        let a = upstream.endpoints.iter().find(|e| e.base == "http://a").unwrap();
        upstream.eject(a);
        for _ in 0..4 {
            assert_eq!(upstream.pick().unwrap().base, "http://b");
        }
    }

    #[test]
    fn endpoint_urls_are_parsed_once_and_bad_ones_refused() {
        let endpoint = Endpoint::parse("http://127.0.0.1:8081/").unwrap();
        assert_eq!((&*endpoint.address, endpoint.path.as_str()), ("127.0.0.1:8081", ""));
        assert_eq!(endpoint.host, "127.0.0.1:8081");
        let endpoint = Endpoint::parse("http://data-service/base/").unwrap();
        assert_eq!((&*endpoint.address, endpoint.path.as_str()), ("data-service:80", "/base"));
        assert_eq!(endpoint.host, "data-service");
        assert_eq!(&*Endpoint::parse("http://[::1]:9/").unwrap().address, "[::1]:9");
        for bad in
            ["https://tls.example", "127.0.0.1:8081", "http://", "http://user@host", "http://h/p?q=1", "http://h:x"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn breaker_opens_after_repeated_failures_and_half_opens_to_probe() {
        let upstream = Upstream::new("u", &["http://a".to_owned()], &settings()).unwrap();
        for _ in 0..3 {
            assert!(matches!(upstream.admit(), Admission::Allowed));
            upstream.record(false);
        }
        // Open for 0 s: the next request is the single probe, everyone else is shed.
        assert!(matches!(upstream.admit(), Admission::Allowed));
        assert!(matches!(upstream.admit(), Admission::Shed(_)));
        upstream.record(true);
        assert!(matches!(upstream.admit(), Admission::Allowed));
    }

    #[test]
    fn a_success_forgets_earlier_failures() {
        let upstream = Upstream::new("u", &["http://a".to_owned()], &settings()).unwrap();
        for _ in 0..3 {
            upstream.record(false);
            upstream.record(false);
            upstream.record(true);
        }
        assert!(matches!(upstream.admit(), Admission::Allowed), "never three failures in a row");
        upstream.record(false);
        upstream.record(false);
        upstream.record(false);
        assert!(matches!(upstream.admit(), Admission::Allowed), "open for 0 s: the probe");
        assert!(matches!(upstream.admit(), Admission::Shed(_)));
    }

    #[test]
    fn retries_are_bounded_by_the_budget() {
        let upstream = Upstream::new("u", &["http://a".to_owned()], &settings()).unwrap();
        let spent = (0..100).filter(|_| upstream.withdraw_retry()).count();
        assert_eq!(spent, 10, "the initial reserve");
        for _ in 0..10 {
            upstream.deposit_retry_budget();
        }
        assert_eq!((0..100).filter(|_| upstream.withdraw_retry()).count(), 5, "half a token per request");
    }
}
