//! Liveness never looks at dependencies; readiness runs the checks and drains.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use observability::HealthCheck;
use observability::healthcheck::{ProbeError, probe};
use observability::server::ServerSettings;
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
async fn draining_turns_readiness_503_but_not_liveness_and_closes_connections() {
    let app = spawn_app().await;
    let ready = app.get("/ready").await;
    assert_eq!(ready.status(), 200);
    assert!(ready.headers().get("connection").is_none_or(|v| v != "close"), "kept alive while serving");
    app.health.begin_draining();
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["connection"], "close");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "draining");
    let health = app.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["connection"], "close", "every response asks the client to go elsewhere");
    let missing = app.get("/no-such-path").await;
    assert_eq!(missing.headers()["connection"], "close", "errors too");
}

fn server_on(address: &str) -> ServerSettings {
    let (host, port) = address.trim_start_matches("http://").rsplit_once(':').unwrap();
    ServerSettings { host: host.to_owned(), port: port.parse().unwrap(), workers: 1 }
}

#[tokio::test]
async fn the_healthcheck_probe_passes_on_a_live_service_also_when_it_listens_on_every_address() {
    let app = spawn_app().await;
    let server = server_on(&app.address);
    tokio::task::spawn_blocking(move || {
        probe(&server).expect("healthy");
        probe(&ServerSettings { host: "0.0.0.0".to_owned(), ..server }).expect("wildcard means loopback");
    })
    .await
    .unwrap();
}

#[test]
fn the_healthcheck_probe_fails_on_a_closed_port_and_on_any_status_but_200() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let error = probe(&server_on(&closed.to_string())).unwrap_err();
    assert!(matches!(error, ProbeError::Io { .. }), "{error}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).unwrap();
        stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").unwrap();
    });
    let error = probe(&server_on(&address.to_string())).unwrap_err();
    assert!(error.to_string().contains("503"), "{error}");
    server.join().unwrap();
}
