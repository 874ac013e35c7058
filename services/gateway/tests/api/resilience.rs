//! Upstream failures: fast 503s, 504 at the deadline, the circuit breaker.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::helpers::{Key, TestUpstream, assert_problem, free_port, gateway_settings, spawn_gateway, unique};

#[tokio::test]
async fn an_unreachable_upstream_is_a_503_problem_and_the_gateway_stays_ready() {
    let key = Key::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gateway = spawn_gateway(gateway_settings(&dead, &key, 1000, 1000, &unique()), key.clone()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let response =
        client.get(gateway.url("/api/v1/items")).bearer_auth(&key.secret).send().await.expect("an answer, not a hang");
    assert_eq!(response.headers()["retry-after"], "1");
    let problem = assert_problem(response, 503).await;
    assert!(problem["detail"].as_str().unwrap().contains("unreachable"));
    let ready = reqwest::get(gateway.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 200, "a failing upstream does not make the gateway unready");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["upstreams"]["status"], "fail");
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("status=\"connect_error\""), "{metrics}");
}

#[tokio::test]
async fn a_slow_upstream_is_cut_off_with_504_at_the_route_timeout() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000, &unique());
    settings.routes[0].timeout_ms = 300;
    let gateway = spawn_gateway(settings, key.clone()).await;
    let response = gateway.get("/api/v1/items/slow?ms=5000").send().await.unwrap();
    assert_problem(response, 504).await;
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 1, "a timeout is not retried");
    assert!(gateway.get("/api/v1/items/slow?ms=0").send().await.unwrap().status().is_success());
}

#[tokio::test]
async fn the_circuit_opens_sheds_load_and_recovers() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000, &unique());
    settings.proxy.breaker_failures = 3;
    settings.proxy.breaker_open_secs = 1;
    let gateway = spawn_gateway(settings, key.clone()).await;

    upstream.failing.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(
            gateway.get("/api/v1/items/flaky").send().await.unwrap().status(),
            500,
            "upstream errors pass through"
        );
    }
    let hits = upstream.hits.load(Ordering::SeqCst);
    let shed = gateway.get("/api/v1/items/flaky").send().await.unwrap();
    assert!(shed.headers().contains_key("retry-after"));
    let problem = assert_problem(shed, 503).await;
    assert!(problem["detail"].as_str().unwrap().contains("circuit open"));
    assert_eq!(upstream.hits.load(Ordering::SeqCst), hits, "shed requests never reach the upstream");
    assert!(gateway.metrics().await.contains("gateway_circuit_state{upstream=\"data-service\"} 1"));

    upstream.failing.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = gateway.get("/api/v1/items/flaky").send().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the breaker never closed again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gateway.metrics().await.contains("gateway_circuit_state{upstream=\"data-service\"} 0"));
}

#[tokio::test]
async fn only_idempotent_requests_are_retried_and_at_most_twice() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 1000, 1000, &unique()), key.clone()).await;

    let response = gateway.get("/api/v1/items/busy").send().await.unwrap();
    assert_eq!(response.status(), 503, "the upstream's 503 after the retries");
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 3, "one try and two retries");

    let response = gateway
        .client
        .post(gateway.url("/api/v1/items/busy"))
        .bearer_auth(&key.secret)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 4, "a POST is never retried");
}

#[tokio::test]
async fn a_dead_endpoint_is_retried_around_and_ejected() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000, &unique());
    let dead = format!("http://127.0.0.1:{}", free_port());
    settings.upstreams.get_mut("data-service").unwrap().urls = vec![dead, upstream.address.clone()];
    let gateway = spawn_gateway(settings, key.clone()).await;

    for _ in 0..10 {
        assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
    }
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 10, "every request reached the live endpoint");
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("gateway_circuit_state{upstream=\"data-service\"} 0"),
        "one dead endpoint does not open the breaker"
    );
}
