//! The upstream-wide circuit breaker, for the one case per-endpoint health cannot help with:
//! every endpoint failing. It counts requests that reached no endpoint at all (connections
//! refused, lost, timed out) while every endpoint is out of rotation or failed its last
//! attempt; `consecutive_failures` of them open it, and requests are then answered 503 at
//! once for `open_ms` (rather than each waiting out connects and timeouts), after which one
//! request probes. Any response from any endpoint, a 5xx included, closes it: an upstream
//! that answers is reachable, and its errors are its own to report (a data service whose
//! database is down still serves cached reads).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics::Gauge;

use crate::configuration::CircuitBreakerSettings;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe request is in flight; everyone else is shed.
    HalfOpen,
}

/// Permission to send a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Shed: the breaker is open; retry after this many seconds.
    Shed(u64),
}

pub struct CircuitBreaker {
    upstream: String,
    state: Mutex<State>,
    /// Closed with no failure counted: the state of nearly every request, read without
    /// taking the lock (which the workers would otherwise contend for twice per request).
    healthy: AtomicBool,
    threshold: u32,
    open_for: Duration,
    gauge: Gauge,
}

impl CircuitBreaker {
    pub fn new(upstream: &str, settings: &CircuitBreakerSettings) -> Self {
        let breaker = Self {
            upstream: upstream.to_owned(),
            state: Mutex::new(State::Closed { failures: 0 }),
            healthy: AtomicBool::new(true),
            threshold: settings.consecutive_failures.max(1),
            open_for: Duration::from_millis(settings.open_ms),
            gauge: metrics::gauge!("gateway_circuit_state", "upstream" => upstream.to_owned()),
        };
        breaker.gauge.set(0.0);
        breaker
    }

    pub fn admit(&self) -> Admission {
        if self.healthy.load(Ordering::Acquire) {
            return Admission::Allowed;
        }
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if Instant::now() >= until => {
                self.change(&mut state, State::HalfOpen);
                Admission::Allowed
            }
            State::Open { until } => Admission::Shed(until.saturating_duration_since(Instant::now()).as_secs().max(1)),
            State::HalfOpen => Admission::Shed(1),
        }
    }

    /// An admitted request got a response from an endpoint.
    pub fn record_answer(&self) {
        if !self.healthy.load(Ordering::Acquire) {
            let mut state = self.lock();
            self.change(&mut state, State::Closed { failures: 0 });
        }
    }

    /// An admitted request reached no endpoint; `every_endpoint_failing` says whether that
    /// is the upstream's state, or one endpoint's bad luck.
    pub fn record_unreachable(&self, every_endpoint_failing: bool) {
        let mut state = self.lock();
        let next = match *state {
            State::Closed { .. } if !every_endpoint_failing => State::Closed { failures: 0 },
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed { failures: failures + 1 },
            _ => State::Open { until: Instant::now() + self.open_for },
        };
        self.change(&mut state, next);
    }

    /// An endpoint answers its health check: let requests through now rather than at the
    /// end of the open period.
    pub fn reset(&self) {
        self.record_answer();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(&self, state: &mut State, next: State) {
        if std::mem::discriminant(&next) != std::mem::discriminant(&*state) {
            tracing::warn!(upstream = %self.upstream, from = ?*state, to = ?next, "circuit breaker changed state");
            self.gauge.set(match next {
                State::Closed { .. } => 0.0,
                State::Open { .. } => 1.0,
                State::HalfOpen => 2.0,
            });
        }
        *state = next;
        self.healthy.store(next == State::Closed { failures: 0 }, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new("u", &CircuitBreakerSettings { consecutive_failures: 3, open_ms: 0 })
    }

    #[test]
    fn opens_only_when_every_endpoint_fails_then_half_opens_to_probe() {
        let breaker = breaker();
        for _ in 0..10 {
            breaker.record_unreachable(false);
        }
        assert_eq!(breaker.admit(), Admission::Allowed, "one endpoint's failures never open it");
        for _ in 0..3 {
            assert_eq!(breaker.admit(), Admission::Allowed);
            breaker.record_unreachable(true);
        }
        // Open for 0 s: the next request is the single probe, everyone else is shed.
        assert_eq!(breaker.admit(), Admission::Allowed);
        assert_eq!(breaker.admit(), Admission::Shed(1));
        breaker.record_answer();
        assert_eq!(breaker.admit(), Admission::Allowed);
    }

    #[test]
    fn any_answer_forgets_earlier_failures() {
        let breaker = breaker();
        for _ in 0..3 {
            breaker.record_unreachable(true);
            breaker.record_unreachable(true);
            breaker.record_answer();
        }
        assert_eq!(breaker.admit(), Admission::Allowed, "never three in a row");
    }

    #[test]
    fn an_endpoint_coming_back_closes_it() {
        let breaker = CircuitBreaker::new("u", &CircuitBreakerSettings { consecutive_failures: 1, open_ms: 60_000 });
        breaker.record_unreachable(true);
        assert!(matches!(breaker.admit(), Admission::Shed(_)));
        breaker.reset();
        assert_eq!(breaker.admit(), Admission::Allowed);
    }
}
