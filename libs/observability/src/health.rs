//! Liveness and readiness.
//!
//! - `GET /health` and its alias `GET /metrics/liveness`: 200 whenever the process can serve.
//!   They check no dependency: a database outage must not get every replica restarted.
//! - `GET /ready`: runs every registered [`HealthCheck`] concurrently, each under a timeout;
//!   200 when all critical checks pass, 503 otherwise and from the moment shutdown begins.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ServiceInfo;
use crate::server::get_or_head;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Longest a single readiness check may take before it counts as failed.
    pub check_timeout_ms: u64,
}

/// A dependency probe for `/ready`.
#[async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// Key of this check in the readiness report (`postgres`, `redis`, ...).
    fn name(&self) -> &'static str;
    /// Whether a failure makes the service unready. Non-critical checks are reported only.
    fn critical(&self) -> bool;
    /// `Err` carries a short, client-safe description of what is wrong.
    async fn check(&self) -> Result<(), String>;
}

/// The registered checks and the draining flag. Cheap to clone.
#[derive(Clone)]
pub struct HealthRegistry(Arc<Inner>);

struct Inner {
    checks: Vec<Arc<dyn HealthCheck>>,
    timeout: Duration,
    draining: AtomicBool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadinessStatus {
    Ready,
    NotReady,
    Draining,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Fail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CheckReport {
    pub status: CheckStatus,
    pub critical: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReadinessReport {
    pub status: ReadinessStatus,
    pub checks: BTreeMap<String, CheckReport>,
    /// RFC 3339, UTC.
    pub timestamp: String,
}

impl HealthRegistry {
    pub fn new(settings: &HealthSettings, checks: Vec<Arc<dyn HealthCheck>>) -> Self {
        Self(Arc::new(Inner {
            checks,
            timeout: Duration::from_millis(settings.check_timeout_ms),
            draining: AtomicBool::new(false),
        }))
    }

    /// Readiness turns 503 from now on; called when shutdown begins.
    pub fn begin_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    pub async fn readiness(&self) -> ReadinessReport {
        if self.is_draining() {
            // No point probing dependencies: the answer is 503 whatever they say.
            return ReadinessReport {
                status: ReadinessStatus::Draining,
                checks: BTreeMap::new(),
                timestamp: now_rfc3339(),
            };
        }
        let timeout = self.0.timeout;
        let runs = self.0.checks.iter().map(|check| async move {
            let started = Instant::now();
            let outcome = match tokio::time::timeout(timeout, check.check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
            };
            let report = CheckReport {
                status: if outcome.is_ok() { CheckStatus::Pass } else { CheckStatus::Fail },
                critical: check.critical(),
                latency_ms: (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                error: outcome.err(),
            };
            (check.name().to_owned(), report)
        });
        let checks: BTreeMap<_, _> = futures_util::future::join_all(runs).await.into_iter().collect();
        let status = if checks.values().any(|c| c.critical && c.status == CheckStatus::Fail) {
            ReadinessStatus::NotReady
        } else {
            ReadinessStatus::Ready
        };
        ReadinessReport { status, checks, timestamp: now_rfc3339() }
    }
}

pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

async fn liveness(service: web::Data<ServiceInfo>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "alive",
        "service": service.name,
        "version": service.version,
    }))
}

async fn readiness(registry: web::Data<HealthRegistry>) -> HttpResponse {
    let report = registry.readiness().await;
    let mut response = match report.status {
        ReadinessStatus::Ready => HttpResponse::Ok(),
        ReadinessStatus::NotReady | ReadinessStatus::Draining => HttpResponse::ServiceUnavailable(),
    };
    response.insert_header(("cache-control", "no-store")).json(report)
}

/// Registers `/health`, `/metrics/liveness` and `/ready` with their data.
pub fn configure_health(service: ServiceInfo, registry: HealthRegistry) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(service))
            .app_data(web::Data::new(registry))
            .route("/health", get_or_head().to(liveness))
            .route("/metrics/liveness", get_or_head().to(liveness))
            .route("/ready", get_or_head().to(readiness));
    }
}
