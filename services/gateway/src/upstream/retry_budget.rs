//! The retry budget (Envoy's `retry_budget.budget_percent`): retries may add at most that
//! share to an upstream's request rate, so that retries cannot multiply the load on an
//! upstream that is already failing. Each request deposits a fraction of a retry token,
//! each retry spends one; a small reserve lets the first retries after a quiet spell through.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Counter;

/// Tokens are counted in thousandths.
const MILLI: u64 = 1000;
/// The reserve, and the most tokens that can be saved up: ten retries.
const MAX_TOKENS_MILLI: u64 = 10 * MILLI;

pub struct RetryBudget {
    tokens_milli: AtomicU64,
    deposit_milli: u64,
    exhausted: Counter,
}

impl RetryBudget {
    pub fn new(upstream: &str, budget_percent: f64) -> Self {
        Self {
            tokens_milli: AtomicU64::new(MAX_TOKENS_MILLI),
            deposit_milli: (budget_percent.clamp(0.0, 100.0) * MILLI as f64 / 100.0) as u64,
            exhausted: metrics::counter!("gateway_retry_budget_exhausted_total", "upstream" => upstream.to_owned()),
        }
    }

    /// Every request adds a fraction of a retry token (up to the cap).
    pub fn deposit(&self) {
        // A full budget (the usual case) is only read: no write for the workers to contend on.
        let _ = self.tokens_milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
            (tokens < MAX_TOKENS_MILLI).then(|| (tokens + self.deposit_milli).min(MAX_TOKENS_MILLI))
        });
    }

    /// Takes one retry token if there is one; counts a refusal.
    pub fn withdraw(&self) -> bool {
        let taken =
            self.tokens_milli.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(MILLI)).is_ok();
        if !taken {
            self.exhausted.increment(1);
        }
        taken
    }

    /// Whole retries available now.
    pub fn available(&self) -> u64 {
        self.tokens_milli.load(Ordering::Relaxed) / MILLI
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_budget() {
        let budget = RetryBudget::new("u", 50.0);
        let spent = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(spent, 10, "the initial reserve");
        assert_eq!(budget.available(), 0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!((0..100).filter(|_| budget.withdraw()).count(), 5, "half a token per request");
    }
}
