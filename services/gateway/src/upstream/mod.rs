//! An upstream: a named set of endpoints and the policies that keep requests off the bad
//! ones. One module per policy:
//!
//! - [`discovery`]: the endpoints, one per address of each configured URL, from DNS;
//! - [`endpoints`]: the choice of an endpoint per attempt (power of two choices, panic
//!   threshold);
//! - [`outlier`]: passive health, ejection after consecutive failures;
//! - [`health_check`]: active health, polling each endpoint's `/ready`;
//! - [`breaker`]: the upstream-wide breaker, for when every endpoint fails;
//! - [`retry_budget`]: how many retries the upstream may be sent.

pub mod breaker;
pub mod discovery;
pub mod endpoints;
pub mod health_check;
pub mod outlier;
pub mod retry_budget;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram};
use observability::metrics::HandleCache;

use self::breaker::{Admission, CircuitBreaker};
use self::discovery::Resolve;
use self::endpoints::Endpoints;
use self::health_check::{HealthCheck, Probe, Transition};
use self::outlier::OutlierDetection;
use self::retry_budget::RetryBudget;
use crate::configuration::{ProxySettings, UpstreamTarget};

/// Why a request is sent again: the `reason` label of `gateway_upstream_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// The request never left the gateway (no connection could be made).
    NotSent,
    /// The connection failed before a response; only for requests safe to repeat.
    ConnectionLost,
    /// The endpoint answered 503; only for requests safe to repeat.
    Unavailable,
}

// Checked when compiling: each reason's index is its position in `ALL`.
const _: () = {
    let mut index = 0;
    while index < RetryReason::ALL.len() {
        assert!(RetryReason::ALL[index] as usize == index);
        index += 1;
    }
};

impl RetryReason {
    const ALL: [RetryReason; 3] = [RetryReason::NotSent, RetryReason::ConnectionLost, RetryReason::Unavailable];

    fn label(self) -> &'static str {
        match self {
            RetryReason::NotSent => "not_sent",
            RetryReason::ConnectionLost => "connection_lost",
            RetryReason::Unavailable => "unavailable",
        }
    }
}

pub struct Upstream {
    pub name: String,
    pub endpoints: Endpoints,
    breaker: CircuitBreaker,
    retry_budget: RetryBudget,
    health_check: Option<HealthCheck>,
    resolver: Arc<dyn Resolve>,
    /// Whether discovery has installed an answer yet: endpoints found at start take
    /// requests at once, those found later after their first health check.
    discovered: AtomicBool,
    duration: Histogram,
    /// `gateway_upstream_requests_total` by outcome (a status code or a failure kind).
    requests: HandleCache<&'static str, Counter>,
    retries: [Counter; RetryReason::ALL.len()],
}

impl Upstream {
    /// The upstream with the endpoints of its address URLs; those of named URLs come with
    /// the first [`Upstream::discover`].
    pub fn new(target: UpstreamTarget, settings: &ProxySettings, resolver: Arc<dyn Resolve>) -> Self {
        let name = target.name;
        let endpoints = Endpoints::new(
            &name,
            target.urls,
            OutlierDetection::new(&settings.outlier_detection),
            settings.healthy_panic_threshold,
        );
        let literal: Vec<_> = endpoints
            .urls()
            .iter()
            .map(|url| match url.host {
                discovery::Host::Ip(ip) => Some(BTreeSet::from([SocketAddr::new(ip, url.port)])),
                discovery::Host::Name(_) => None,
            })
            .collect();
        endpoints.replace(&literal, true);
        Self {
            breaker: CircuitBreaker::new(&name, &settings.circuit_breaker),
            retry_budget: RetryBudget::new(&name, settings.retry_budget.budget_percent),
            health_check: HealthCheck::new(&settings.health_check),
            resolver,
            discovered: AtomicBool::new(false),
            duration: metrics::histogram!("gateway_upstream_duration_seconds", "upstream" => name.clone()),
            requests: HandleCache::new(),
            retries: RetryReason::ALL.map(|reason| {
                metrics::counter!("gateway_upstream_retries_total", "upstream" => name.clone(), "reason" => reason.label())
            }),
            endpoints,
            name,
        }
    }

    /// Whether any URL names a host, to be resolved again and again.
    pub fn is_discovered(&self) -> bool {
        self.endpoints.urls().iter().any(|url| url.is_named())
    }

    /// Resolves every URL and installs the answer; a failed lookup keeps the URL's last
    /// addresses.
    pub async fn discover(&self) {
        let mut found = Vec::with_capacity(self.endpoints.urls().len());
        for url in self.endpoints.urls() {
            match discovery::addresses(url, &*self.resolver).await {
                Ok(addresses) => found.push(Some(addresses)),
                Err(error) => {
                    tracing::warn!(upstream = %self.name, url = %url.base, %error, "cannot resolve an upstream URL; keeping its last addresses");
                    found.push(None);
                }
            }
        }
        let trusted = self.health_check.is_none() || !self.discovered.load(Ordering::Relaxed);
        let changes = self.endpoints.replace(&found, trusted);
        if found.iter().any(Option::is_some) {
            self.discovered.store(true, Ordering::Relaxed);
        }
        if !changes.added.is_empty() || !changes.removed.is_empty() {
            tracing::info!(
                upstream = %self.name,
                added = ?changes.added,
                removed = ?changes.removed,
                endpoints = self.endpoints.snapshot().len(),
                "upstream endpoints changed"
            );
        }
    }

    pub fn health_check(&self) -> Option<&HealthCheck> {
        self.health_check.as_ref()
    }

    /// One round of active health checks: every endpoint probed at once.
    pub async fn check_health(&self) {
        let Some(check) = &self.health_check else { return };
        let endpoints = self.endpoints.snapshot();
        let probes = futures_util::future::join_all(endpoints.iter().map(|endpoint| check.probe(endpoint))).await;
        // An endpoint answers: the upstream is reachable, whatever the breaker last saw.
        if probes.contains(&Probe::Ready) {
            self.breaker.reset();
        }
        let now_ms = self.endpoints.now_ms();
        for (endpoint, probe) in endpoints.iter().zip(probes) {
            let transition = check.apply(endpoint, &probe);
            match transition {
                Transition::None => {}
                Transition::WentOut => {
                    let found = match &probe {
                        Probe::Unready(status) => format!("answered {status}"),
                        Probe::NoAnswer(cause) => cause.clone(),
                        Probe::Ready => String::new(),
                    };
                    tracing::warn!(upstream = %self.name, endpoint = %endpoint.address, probe = %found, "endpoint out of rotation: health check failed");
                }
                Transition::CameBack => {
                    tracing::info!(upstream = %self.name, endpoint = %endpoint.address, "endpoint back in rotation: health check passed");
                }
            }
            // An endpoint that answers again ends its ejection when it came back from a
            // failed health check (a restart), or when it was ejected for failed connects,
            // which the answer disproves. One ejected for failing answers serves its time.
            let disproved = transition == Transition::CameBack || endpoint.outlier.is_ejected_for_connects(now_ms);
            if probe == Probe::Ready && disproved && endpoint.outlier.is_ejected(now_ms) {
                endpoint.outlier.reinstate(now_ms);
                tracing::info!(upstream = %self.name, endpoint = %endpoint.address, "ejection ended: the endpoint answers its health check");
            }
        }
    }

    pub fn admit(&self) -> Admission {
        self.breaker.admit()
    }

    /// A request got a response from an endpoint.
    pub fn record_answer(&self) {
        self.breaker.record_answer();
    }

    /// A request reached no endpoint.
    pub fn record_unreachable(&self) {
        self.breaker.record_unreachable(self.endpoints.all_failing());
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

    pub fn deposit_retry_budget(&self) {
        self.retry_budget.deposit();
    }

    /// Permission for one retry, within the budget; counted either way.
    pub fn withdraw_retry(&self, reason: RetryReason) -> bool {
        let allowed = self.retry_budget.withdraw();
        if allowed {
            self.retries[reason as usize].increment(1);
        }
        allowed
    }

    /// Sets the gauges that describe the upstream now; run before every scrape.
    pub fn publish_gauges(&self) {
        let name = self.name.clone();
        let (in_rotation, total) = self.endpoints.rotation();
        metrics::gauge!("gateway_upstream_endpoints", "upstream" => name.clone(), "state" => "in_rotation")
            .set(in_rotation as f64);
        metrics::gauge!("gateway_upstream_endpoints", "upstream" => name.clone(), "state" => "out_of_rotation")
            .set((total - in_rotation) as f64);
        metrics::gauge!("gateway_upstream_panic", "upstream" => name.clone()).set(if self.endpoints.in_panic() {
            1.0
        } else {
            0.0
        });
        metrics::gauge!("gateway_retry_budget_available", "upstream" => name.clone())
            .set(self.retry_budget.available() as f64);
        let now_ms = self.endpoints.now_ms();
        for endpoint in self.endpoints.snapshot().iter() {
            let label = endpoint.address.to_string();
            metrics::gauge!("gateway_endpoint_in_rotation", "upstream" => name.clone(), "endpoint" => label.clone())
                .set(if endpoint.in_rotation(now_ms) { 1.0 } else { 0.0 });
            metrics::gauge!("gateway_endpoint_healthy", "upstream" => name.clone(), "endpoint" => label.clone())
                .set(if endpoint.is_healthy() { 1.0 } else { 0.0 });
            metrics::gauge!("gateway_endpoint_in_flight", "upstream" => name.clone(), "endpoint" => label)
                .set(f64::from(endpoint.in_flight()));
        }
    }

    /// For the gateway's readiness report: how many endpoints are in rotation.
    pub fn rotation_report(&self) -> Result<String, String> {
        let (in_rotation, total) = self.endpoints.rotation();
        let report = format!("{}: {in_rotation} of {total} endpoints in rotation", self.name);
        if in_rotation == 0 { Err(report) } else { Ok(report) }
    }
}
