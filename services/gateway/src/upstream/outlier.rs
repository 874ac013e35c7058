//! Outlier detection: passive health, from what real requests see, as Envoy's outlier
//! detection and nginx's `max_fails` do.
//!
//! An endpoint that fails `consecutive_5xx` requests in a row (5xx answers, connections lost
//! mid-exchange, timeouts), or `consecutive_local_origin_failure` connects in a row, is
//! ejected: taken out of rotation for `base_ejection_time` times the number of its recent
//! ejections (capped at `max_ejection_time`). Each `base_ejection_time` spent in rotation
//! takes one off that number, so an endpoint that fails again soon rests longer, and one
//! that has been fine for a while starts over. At most `max_ejection_percent` of an
//! upstream's endpoints are ejected at once, and never the last one.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::configuration::OutlierDetectionSettings;

/// How one attempt at an endpoint went, as outlier detection (and the endpoint's metrics)
/// count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived with this status.
    Answered(u16),
    /// No connection could be made, or a new one closed before the request was written.
    ConnectFailed,
    /// The connection failed after the request was written, before the response head.
    ConnectionLost,
    /// No response head by the route's deadline.
    TimedOut,
}

impl Outcome {
    /// The endpoint metrics' `outcome` label: a status class or a failure kind.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered(status) => match status {
                100..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            Outcome::ConnectFailed => "connect_error",
            Outcome::ConnectionLost => "connection_lost",
            Outcome::TimedOut => "timeout",
        }
    }

    pub const LABELS: [&'static str; 7] = ["2xx", "3xx", "4xx", "5xx", "connect_error", "connection_lost", "timeout"];

    pub fn label_index(self) -> usize {
        Self::LABELS.iter().position(|label| *label == self.label()).unwrap_or(0)
    }
}

/// Why an endpoint was ejected: the `reason` label of its ejections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectionReason {
    Consecutive5xx,
    LocalOrigin,
}

impl EjectionReason {
    pub fn label(self) -> &'static str {
        match self {
            EjectionReason::Consecutive5xx => "consecutive_5xx",
            EjectionReason::LocalOrigin => "local_origin",
        }
    }
}

/// One endpoint's passive health. Read on every request, written only when something fails:
/// a success writes nothing unless a failure was being counted.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_local_origin: AtomicU32,
    /// Milliseconds after the upstream's epoch until which the endpoint is (or was last)
    /// ejected; 0: never ejected.
    ejected_until_ms: AtomicU64,
    /// The multiplier of the last ejection.
    ejections: AtomicU32,
    /// Whether the last ejection was for failed connects, which a passing health check
    /// disproves (failing answers it does not).
    ejected_for_connects: AtomicBool,
}

impl OutlierState {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Whether the last attempt at this endpoint failed.
    pub fn is_failing(&self) -> bool {
        self.consecutive_5xx.load(Ordering::Relaxed) > 0 || self.consecutive_local_origin.load(Ordering::Relaxed) > 0
    }

    /// Whether the current ejection is for failed connects.
    pub fn is_ejected_for_connects(&self, now_ms: u64) -> bool {
        self.is_ejected(now_ms) && self.ejected_for_connects.load(Ordering::Relaxed)
    }

    /// Ends an ejection early (the active health check saw the endpoint answer).
    pub fn reinstate(&self, now_ms: u64) {
        let _ = self
            .ejected_until_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |until| (until > now_ms).then_some(now_ms));
        self.reset_counts();
    }

    fn reset_counts(&self) {
        for count in [&self.consecutive_5xx, &self.consecutive_local_origin] {
            if count.load(Ordering::Relaxed) != 0 {
                count.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// The policy, from `proxy.outlier_detection`.
#[derive(Clone, Debug)]
pub struct OutlierDetection {
    consecutive_5xx: u32,
    consecutive_local_origin: u32,
    base_ejection_ms: u64,
    max_ejection_ms: u64,
    max_ejection_percent: u32,
}

impl OutlierDetection {
    pub fn new(settings: &OutlierDetectionSettings) -> Self {
        Self {
            consecutive_5xx: settings.consecutive_5xx.max(1),
            consecutive_local_origin: settings.consecutive_local_origin_failure.max(1),
            base_ejection_ms: settings.base_ejection_time_ms,
            max_ejection_ms: settings.max_ejection_time_ms.max(settings.base_ejection_time_ms),
            max_ejection_percent: settings.max_ejection_percent.min(100),
        }
    }

    /// Counts `outcome`; returns why the endpoint should now be ejected, if it should.
    pub fn record(&self, state: &OutlierState, outcome: Outcome) -> Option<EjectionReason> {
        let (count, threshold, reason) = match outcome {
            Outcome::Answered(status) if status < 500 => {
                state.reset_counts();
                return None;
            }
            Outcome::Answered(_) | Outcome::ConnectionLost | Outcome::TimedOut => {
                (&state.consecutive_5xx, self.consecutive_5xx, EjectionReason::Consecutive5xx)
            }
            Outcome::ConnectFailed => {
                (&state.consecutive_local_origin, self.consecutive_local_origin, EjectionReason::LocalOrigin)
            }
        };
        (count.fetch_add(1, Ordering::Relaxed) + 1 >= threshold).then_some(reason)
    }

    /// How many of `total` endpoints may be ejected at once: `max_ejection_percent` of them,
    /// at least one, and never all.
    pub fn max_ejected(&self, total: usize) -> usize {
        (total * self.max_ejection_percent as usize / 100).max(1).min(total.saturating_sub(1))
    }

    /// Ejects the endpoint from `now_ms` for `reason`; returns for how long (milliseconds).
    pub fn eject(&self, state: &OutlierState, reason: EjectionReason, now_ms: u64) -> u64 {
        let last_until = state.ejected_until_ms.load(Ordering::Relaxed);
        let previous = state.ejections.load(Ordering::Relaxed);
        // One off the multiplier for every base ejection time in rotation since the last.
        let quiet_ms = now_ms.saturating_sub(last_until);
        let forgiven = if last_until == 0 { u64::from(previous) } else { quiet_ms / self.base_ejection_ms.max(1) };
        let multiplier = u32::try_from(u64::from(previous).saturating_sub(forgiven)).unwrap_or(0) + 1;
        let ejection_ms = self.base_ejection_ms.saturating_mul(u64::from(multiplier)).min(self.max_ejection_ms);
        state.ejections.store(multiplier, Ordering::Relaxed);
        state.ejected_for_connects.store(reason == EjectionReason::LocalOrigin, Ordering::Relaxed);
        state.ejected_until_ms.store(now_ms.saturating_add(ejection_ms).max(1), Ordering::Relaxed);
        state.reset_counts();
        ejection_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection() -> OutlierDetection {
        OutlierDetection::new(&OutlierDetectionSettings {
            consecutive_5xx: 3,
            consecutive_local_origin_failure: 1,
            base_ejection_time_ms: 1000,
            max_ejection_time_ms: 2500,
            max_ejection_percent: 50,
        })
    }

    #[test]
    fn consecutive_failures_reach_the_threshold_and_a_success_starts_over() {
        let (detection, state) = (detection(), OutlierState::default());
        assert_eq!(detection.record(&state, Outcome::Answered(503)), None);
        assert_eq!(detection.record(&state, Outcome::TimedOut), None);
        assert_eq!(detection.record(&state, Outcome::Answered(404)), None, "a 4xx is the client's");
        assert!(!state.is_failing());
        assert_eq!(detection.record(&state, Outcome::Answered(500)), None);
        assert_eq!(detection.record(&state, Outcome::ConnectionLost), None);
        assert_eq!(detection.record(&state, Outcome::Answered(502)), Some(EjectionReason::Consecutive5xx));
        assert_eq!(detection.record(&state, Outcome::ConnectFailed), Some(EjectionReason::LocalOrigin));
    }

    #[test]
    fn repeated_ejections_last_longer_up_to_the_maximum_and_quiet_time_forgives() {
        let (detection, state) = (detection(), OutlierState::default());
        assert_eq!(detection.eject(&state, EjectionReason::Consecutive5xx, 10_000), 1000);
        assert!(state.is_ejected(10_999) && !state.is_ejected(11_000));
        assert_eq!(
            detection.eject(&state, EjectionReason::Consecutive5xx, 11_000),
            2000,
            "ejected again at once: twice as long"
        );
        assert_eq!(detection.eject(&state, EjectionReason::Consecutive5xx, 13_000), 2500, "three times, capped");
        // 2 s in rotation after the last ejection ended: two off the multiplier of 3.
        assert_eq!(detection.eject(&state, EjectionReason::Consecutive5xx, 15_500 + 2000), 2000);
        // A long quiet spell: back to one.
        assert_eq!(detection.eject(&state, EjectionReason::Consecutive5xx, 100_000), 1000);
    }

    #[test]
    fn reinstating_ends_an_ejection_and_forgets_the_failures() {
        let (detection, state) = (detection(), OutlierState::default());
        detection.record(&state, Outcome::Answered(500));
        detection.eject(&state, EjectionReason::Consecutive5xx, 1000);
        assert!(state.is_ejected(1500));
        state.reinstate(1500);
        assert!(!state.is_ejected(1500));
        assert!(!state.is_failing());
    }

    #[test]
    fn an_ejection_remembers_whether_it_was_for_failed_connects() {
        let (detection, state) = (detection(), OutlierState::default());
        detection.eject(&state, EjectionReason::LocalOrigin, 1000);
        assert!(state.is_ejected_for_connects(1500));
        state.reinstate(1500);
        detection.eject(&state, EjectionReason::Consecutive5xx, 2000);
        assert!(state.is_ejected(2500) && !state.is_ejected_for_connects(2500));
    }

    #[test]
    fn at_most_the_share_of_endpoints_and_never_all_of_them() {
        let detection = detection();
        assert_eq!(detection.max_ejected(1), 0, "the last endpoint stays");
        assert_eq!(detection.max_ejected(2), 1);
        assert_eq!(detection.max_ejected(3), 1);
        assert_eq!(detection.max_ejected(10), 5);
        let all = OutlierDetection { max_ejection_percent: 100, ..detection };
        assert_eq!(all.max_ejected(4), 3);
    }
}
