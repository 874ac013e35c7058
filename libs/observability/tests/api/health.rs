//! Liveness never looks at dependencies; readiness runs the checks and drains.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use observability::HealthCheck;
use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with_checks};

struct Fixed {
    name: &'static str,
    critical: bool,
    outcome: Result<(), &'static str>,
}

#[async_trait]
impl HealthCheck for Fixed {
    fn name(&self) -> &'static str {
        self.name
    }
    fn critical(&self) -> bool {
        self.critical
    }
    async fn check(&self) -> Result<(), String> {
        self.outcome.map_err(str::to_owned)
    }
}

struct Hangs;

#[async_trait]
impl HealthCheck for Hangs {
    fn name(&self) -> &'static str {
        "hangs"
    }
    fn critical(&self) -> bool {
        true
    }
    async fn check(&self) -> Result<(), String> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

fn check(name: &'static str, critical: bool, outcome: Result<(), &'static str>) -> Arc<dyn HealthCheck> {
    Arc::new(Fixed { name, critical, outcome })
}

#[tokio::test]
async fn liveness_ignores_dependencies() {
    let app = spawn_app_with_checks(vec![check("db", true, Err("down"))]).await;
    for path in ["/health", "/metrics/liveness"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "alive");
        assert_eq!(body["service"], "observability-test");
    }
}

#[tokio::test]
async fn ready_when_every_critical_check_passes() {
    let app =
        spawn_app_with_checks(vec![check("db", true, Ok(())), check("cache", false, Err("connection refused"))]).await;
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["db"]["status"], "pass");
    assert_eq!(body["checks"]["db"]["critical"], true);
    assert!(body["checks"]["db"]["error"].is_null());
    assert!(body["checks"]["db"]["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(body["checks"]["cache"]["status"], "fail");
    assert_eq!(body["checks"]["cache"]["error"], "connection refused");
    let timestamp = body["timestamp"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339).is_ok(),
        "{timestamp}"
    );
}

#[tokio::test]
async fn a_failing_critical_check_makes_it_unready() {
    let app = spawn_app_with_checks(vec![
        check("db", true, Err("password authentication failed")),
        check("cache", false, Ok(())),
    ])
    .await;
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["checks"]["db"]["error"], "password authentication failed");
}

#[tokio::test]
async fn a_hanging_check_times_out_and_fails() {
    let app = spawn_app_with_checks(vec![Arc::new(Hangs), check("db", true, Ok(()))]).await;
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["hangs"]["status"], "fail");
    assert_eq!(body["checks"]["hangs"]["error"], "timed out after 300 ms");
    assert!(body["checks"]["hangs"]["latency_ms"].as_f64().unwrap() >= 300.0);
    assert_eq!(body["checks"]["db"]["status"], "pass", "checks run independently");
}

#[tokio::test]
async fn draining_turns_readiness_503_but_not_liveness() {
    let app = spawn_app().await;
    assert_eq!(app.get("/ready").await.status(), 200);
    app.health.begin_draining();
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "draining");
    assert_eq!(app.get("/health").await.status(), 200);
}
