//! An upstream's endpoints and the choice of one per attempt.
//!
//! An endpoint is in rotation while its active health check passes and outlier detection
//! has not ejected it. Each attempt goes to the less busy (fewer requests in flight) of two
//! endpoints in rotation picked at random ("power of two choices"): a slow or failing
//! endpoint accumulates requests in flight and is chosen less, without the herd a "least
//! busy of all" rule causes. A retry prefers endpoints the request has not tried yet.
//!
//! When fewer than `healthy_panic_threshold` percent of the endpoints are in rotation, the
//! gateway stops trusting its view (Envoy's panic threshold): a dependency every instance
//! shares, such as the database, makes them all unready at once, and they can still serve
//! what does not need it (cached reads). Then every endpoint takes requests.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::{Counter, Histogram};

use super::discovery::EndpointUrl;
use super::outlier::{EjectionReason, Outcome, OutlierDetection, OutlierState};

pub struct Endpoint {
    pub address: SocketAddr,
    /// The configured URL this address came from (its `Host` header and path).
    pub url: Arc<EndpointUrl>,
    /// Index of that URL in the upstream's list.
    url_index: usize,
    in_flight: AtomicU32,
    pub(super) outlier: OutlierState,
    /// What the active health check last concluded.
    healthy: AtomicBool,
    pub(super) health_probes: ProbeCounts,
    metrics: EndpointMetrics,
}

/// Consecutive probe results, kept by the health-check loop alone.
#[derive(Default)]
pub struct ProbeCounts {
    pub passed: AtomicU32,
    pub missed: AtomicU32,
}

struct EndpointMetrics {
    /// `gateway_endpoint_requests_total` by [`Outcome::LABELS`].
    requests: [Counter; Outcome::LABELS.len()],
    duration: Histogram,
    ejections: [Counter; 2],
}

impl Endpoint {
    fn new(upstream: &str, url: Arc<EndpointUrl>, url_index: usize, address: SocketAddr, healthy: bool) -> Self {
        let label = address.to_string();
        let requests = Outcome::LABELS.map(|outcome| {
            metrics::counter!("gateway_endpoint_requests_total", "upstream" => upstream.to_owned(), "endpoint" => label.clone(), "outcome" => outcome)
        });
        let ejections = [EjectionReason::Consecutive5xx, EjectionReason::LocalOrigin].map(|reason| {
            metrics::counter!("gateway_endpoint_ejections_total", "upstream" => upstream.to_owned(), "endpoint" => label.clone(), "reason" => reason.label())
        });
        let duration = metrics::histogram!("gateway_endpoint_duration_seconds", "upstream" => upstream.to_owned(), "endpoint" => label);
        Self {
            address,
            url,
            url_index,
            in_flight: AtomicU32::new(0),
            outlier: OutlierState::default(),
            healthy: AtomicBool::new(healthy),
            health_probes: ProbeCounts::default(),
            metrics: EndpointMetrics { requests, duration, ejections },
        }
    }

    pub fn in_rotation(&self, now_ms: u64) -> bool {
        self.is_healthy() && !self.outlier.is_ejected(now_ms)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(super) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request in flight on this endpoint until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight on an endpoint.
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Every endpoint of one upstream, replaced whole when discovery finds a change.
pub struct Endpoints {
    upstream: String,
    urls: Vec<Arc<EndpointUrl>>,
    current: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Origin of the millisecond clock outlier detection counts in.
    epoch: Instant,
    outlier: OutlierDetection,
    /// Held while deciding an ejection, so two workers cannot both eject the last allowed.
    ejecting: Mutex<()>,
    panic_threshold_percent: usize,
}

/// What a discovery round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

impl Endpoints {
    pub fn new(
        upstream: &str,
        urls: Vec<EndpointUrl>,
        outlier: OutlierDetection,
        panic_threshold_percent: u32,
    ) -> Self {
        Self {
            upstream: upstream.to_owned(),
            urls: urls.into_iter().map(Arc::new).collect(),
            current: ArcSwap::from_pointee(Vec::new()),
            epoch: Instant::now(),
            outlier,
            ejecting: Mutex::new(()),
            panic_threshold_percent: panic_threshold_percent.min(100) as usize,
        }
    }

    pub fn urls(&self) -> &[Arc<EndpointUrl>] {
        &self.urls
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.current.load_full()
    }

    /// The endpoint for the next attempt, or `None` when the upstream has none. `tried`
    /// holds the addresses this request already tried.
    pub fn choose(&self, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let set = self.current.load();
        if set.len() <= 1 {
            return set.first().cloned();
        }
        let now_ms = self.now_ms();
        let panic = self.panics(count_in_rotation(&set, now_ms), set.len());
        let eligible = |e: &Endpoint| panic || e.in_rotation(now_ms);
        let untried = |e: &Endpoint| eligible(e) && !tried.contains(&e.address);
        let chosen = if tried.is_empty() { pick_less_busy(&set, eligible) } else { pick_less_busy(&set, untried) };
        chosen.or_else(|| pick_less_busy(&set, eligible)).cloned()
    }

    /// Whether requests go to every endpoint because too few are in rotation.
    pub fn in_panic(&self) -> bool {
        let set = self.current.load();
        !set.is_empty() && self.panics(count_in_rotation(&set, self.now_ms()), set.len())
    }

    /// How many endpoints are in rotation now, of how many.
    pub fn rotation(&self) -> (usize, usize) {
        let set = self.current.load();
        (count_in_rotation(&set, self.now_ms()), set.len())
    }

    /// Whether `in_rotation` of `total` endpoints is below the panic threshold (or none).
    fn panics(&self, in_rotation: usize, total: usize) -> bool {
        in_rotation * 100 < self.panic_threshold_percent * total || in_rotation == 0
    }

    /// Whether every endpoint is out of rotation or failed its last attempt.
    pub fn all_failing(&self) -> bool {
        let now_ms = self.now_ms();
        self.current.load().iter().all(|e| !e.in_rotation(now_ms) || e.outlier.is_failing())
    }

    /// Records how an attempt at `endpoint` went: its metrics, and outlier detection, which
    /// may eject it.
    pub fn record(&self, endpoint: &Endpoint, outcome: Outcome, elapsed: Duration) {
        endpoint.metrics.requests[outcome.label_index()].increment(1);
        endpoint.metrics.duration.record(elapsed.as_secs_f64());
        if let Some(reason) = self.outlier.record(&endpoint.outlier, outcome) {
            self.eject(endpoint, reason);
        }
    }

    fn eject(&self, endpoint: &Endpoint, reason: EjectionReason) {
        let _deciding = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = self.now_ms();
        if endpoint.outlier.is_ejected(now_ms) {
            return;
        }
        let set = self.current.load();
        let ejected = set.iter().filter(|e| e.outlier.is_ejected(now_ms)).count();
        if ejected >= self.outlier.max_ejected(set.len()) {
            tracing::warn!(
                upstream = %self.upstream,
                endpoint = %endpoint.address,
                reason = reason.label(),
                ejected,
                "endpoint failing but not ejected: outlier_detection.max_ejection_percent reached"
            );
            return;
        }
        let ejection_ms = self.outlier.eject(&endpoint.outlier, reason, now_ms);
        endpoint.metrics.ejections[usize::from(reason == EjectionReason::LocalOrigin)].increment(1);
        tracing::warn!(
            upstream = %self.upstream,
            endpoint = %endpoint.address,
            reason = reason.label(),
            ejection_ms,
            "endpoint ejected"
        );
    }

    /// Installs what discovery found: `found[i]` holds the addresses of URL `i`, or `None`
    /// when its lookup failed (it keeps the addresses it had). Endpoints that stay keep
    /// their state; an address named by two URLs is one endpoint, of the first. New
    /// endpoints start in rotation when `trusted`, else out until their first health check
    /// passes (an instance that has just appeared in DNS may not be listening yet).
    pub fn replace(&self, found: &[Option<BTreeSet<SocketAddr>>], trusted: bool) -> Changes {
        let old = self.current.load_full();
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(old.len());
        for (index, url) in self.urls.iter().enumerate() {
            let addresses: BTreeSet<SocketAddr> = match found.get(index) {
                Some(Some(addresses)) => addresses.clone(),
                _ => old.iter().filter(|e| e.url_index == index).map(|e| e.address).collect(),
            };
            for address in addresses {
                if next.iter().any(|e| e.address == address) {
                    continue;
                }
                let kept = old.iter().find(|e| e.address == address && e.url_index == index).cloned();
                next.push(
                    kept.unwrap_or_else(|| {
                        Arc::new(Endpoint::new(&self.upstream, url.clone(), index, address, trusted))
                    }),
                );
            }
        }
        let changes = Changes {
            added: next.iter().filter(|e| !old.iter().any(|o| Arc::ptr_eq(o, e))).map(|e| e.address).collect(),
            removed: old.iter().filter(|o| !next.iter().any(|e| Arc::ptr_eq(o, e))).map(|e| e.address).collect(),
        };
        if changes != Changes::default() {
            self.current.store(Arc::new(next));
        }
        changes
    }
}

fn count_in_rotation(set: &[Arc<Endpoint>], now_ms: u64) -> usize {
    set.iter().filter(|e| e.in_rotation(now_ms)).count()
}

/// Power of two choices among the endpoints `eligible` admits.
fn pick_less_busy(set: &[Arc<Endpoint>], eligible: impl Fn(&Endpoint) -> bool) -> Option<&Arc<Endpoint>> {
    let count = set.iter().filter(|e| eligible(e)).count();
    let nth = |n: usize| set.iter().filter(|e| eligible(e)).nth(n);
    match count {
        0 => None,
        1 => nth(0),
        _ => {
            let first = fastrand::usize(..count);
            let mut second = fastrand::usize(..count - 1);
            if second >= first {
                second += 1;
            }
            let (a, b) = (nth(first)?, nth(second)?);
            Some(if b.in_flight() < a.in_flight() { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::configuration::OutlierDetectionSettings;

    fn endpoints(count: u8, max_ejection_percent: u32) -> Endpoints {
        let outlier = OutlierDetection::new(&OutlierDetectionSettings {
            consecutive_5xx: 2,
            consecutive_local_origin_failure: 1,
            base_ejection_time_ms: 60_000,
            max_ejection_time_ms: 60_000,
            max_ejection_percent,
        });
        let url = EndpointUrl::parse("http://svc:8081").unwrap();
        let endpoints = Endpoints::new("test", vec![url], outlier, 50);
        let addresses = (1..=count).map(|i| SocketAddr::from(([10, 0, 0, i], 8081))).collect();
        endpoints.replace(&[Some(addresses)], true);
        endpoints
    }

    fn address(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8081))
    }

    fn find(endpoints: &Endpoints, i: u8) -> Arc<Endpoint> {
        endpoints.snapshot().iter().find(|e| e.address == address(i)).cloned().unwrap()
    }

    #[test]
    fn the_less_busy_endpoint_wins_and_retries_go_elsewhere() {
        let endpoints = endpoints(2, 50);
        let busy = find(&endpoints, 1);
        let _requests: Vec<_> = (0..3).map(|_| busy.start()).collect();
        for _ in 0..20 {
            assert_eq!(endpoints.choose(&[]).unwrap().address, address(2), "two of two: always the less busy");
        }
        assert_eq!(endpoints.choose(&[address(2)]).unwrap().address, address(1), "a retry prefers an untried one");
        assert_eq!(busy.in_flight(), 3);
        drop(_requests);
        assert_eq!(busy.in_flight(), 0);
    }

    #[test]
    fn an_ejected_endpoint_is_skipped_but_never_the_last_one() {
        let endpoints = endpoints(2, 100);
        let first = find(&endpoints, 1);
        endpoints.record(&first, Outcome::ConnectFailed, Duration::ZERO);
        assert!(first.outlier.is_ejected(endpoints.now_ms()));
        for _ in 0..20 {
            assert_eq!(endpoints.choose(&[]).unwrap().address, address(2));
        }
        let second = find(&endpoints, 2);
        endpoints.record(&second, Outcome::ConnectFailed, Duration::ZERO);
        assert!(!second.outlier.is_ejected(endpoints.now_ms()), "the last endpoint in rotation stays");
    }

    #[test]
    fn below_the_panic_threshold_every_endpoint_takes_requests() {
        let endpoints = endpoints(3, 50);
        for i in [1, 2] {
            find(&endpoints, i).set_healthy(false);
        }
        assert!(endpoints.in_panic(), "one of three in rotation is below 50%");
        let chosen: BTreeSet<_> = (0..200).map(|_| endpoints.choose(&[]).unwrap().address).collect();
        assert_eq!(chosen.len(), 3, "{chosen:?}");
        find(&endpoints, 1).set_healthy(true);
        assert!(!endpoints.in_panic());
        let chosen: BTreeSet<_> = (0..200).map(|_| endpoints.choose(&[]).unwrap().address).collect();
        assert_eq!(chosen, BTreeSet::from([address(1), address(3)]));
    }

    #[test]
    fn discovery_adds_and_removes_endpoints_and_keeps_the_state_of_those_that_stay() {
        let endpoints = endpoints(2, 50);
        let kept = find(&endpoints, 2);
        let _request = kept.start();
        let changes = endpoints.replace(&[Some(BTreeSet::from([address(2), address(3)]))], false);
        assert_eq!(changes, Changes { added: vec![address(3)], removed: vec![address(1)] });
        assert!(Arc::ptr_eq(&find(&endpoints, 2), &kept));
        assert!(kept.is_healthy(), "an endpoint that stays keeps its state");
        assert!(!find(&endpoints, 3).is_healthy(), "a new one waits for its first health check");
        assert_eq!(endpoints.replace(&[None], false), Changes::default(), "a failed lookup keeps what was there");
        assert_eq!(endpoints.snapshot().len(), 2);
    }

    #[test]
    fn every_endpoint_failing_is_told_apart_from_one() {
        let endpoints = endpoints(2, 50);
        assert!(!endpoints.all_failing());
        endpoints.record(&find(&endpoints, 1), Outcome::Answered(503), Duration::ZERO);
        assert!(!endpoints.all_failing());
        endpoints.record(&find(&endpoints, 2), Outcome::TimedOut, Duration::ZERO);
        assert!(endpoints.all_failing());
        endpoints.record(&find(&endpoints, 2), Outcome::Answered(200), Duration::ZERO);
        assert!(!endpoints.all_failing());
    }
}
