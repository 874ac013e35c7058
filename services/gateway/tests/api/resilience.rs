//! Upstream failures: fast 503s, 504 at the deadline, retries and what may be retried, the
//! circuit breaker for an upstream whose every endpoint fails.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{
    Deadline, HangingUpUpstream, Key, TestUpstream, assert_problem, free_port, gateway_settings, gateway_settings_for,
    spawn_gateway, unique,
};

#[tokio::test]
async fn an_unreachable_upstream_is_a_503_problem_and_the_gateway_stays_ready() {
    let key = Key::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gateway = spawn_gateway(gateway_settings(&dead, &key, 1000, 1000), key.clone()).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let response =
        client.get(gateway.url("/api/v1/items")).bearer_auth(&key.secret).send().await.expect("an answer, not a hang");
    assert_eq!(response.headers()["retry-after"], "1");
    let problem = assert_problem(response, 503).await;
    assert!(problem["detail"].as_str().unwrap().contains("unreachable"));
    assert!(gateway.upstream_metric("gateway_upstream_requests_total", &[("status", "connect_error")]).await >= 1.0);

    // The health check soon finds the endpoint gone: reported, but the gateway stays ready.
    let deadline = Deadline::after_secs(10);
    loop {
        let ready = reqwest::get(gateway.url("/ready")).await.unwrap();
        assert_eq!(ready.status(), 200, "a failing upstream does not make the gateway unready");
        let body: serde_json::Value = ready.json().await.unwrap();
        if body["checks"]["upstreams"]["status"] == "fail" {
            assert!(body["checks"]["upstreams"]["error"].as_str().unwrap().contains("0 of 1 endpoints in rotation"));
            break;
        }
        deadline.check("the upstream reported out of rotation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_slow_upstream_is_cut_off_with_504_at_the_route_timeout() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000);
    settings.routes[0].timeout_ms = 300;
    let gateway = spawn_gateway(settings, key.clone()).await;
    let response = gateway.get("/api/v1/items/slow?ms=5000").send().await.unwrap();
    assert_problem(response, 504).await;
    assert_eq!(upstream.hits(), 1, "a timeout is not retried");
    assert!(gateway.get("/api/v1/items/slow?ms=0").send().await.unwrap().status().is_success());
}

#[tokio::test]
async fn a_503_is_retried_for_requests_safe_to_repeat_and_at_most_twice() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 1000, 1000), key.clone()).await;

    let response = gateway.get("/api/v1/items/busy").send().await.unwrap();
    assert_eq!(response.status(), 503, "the upstream's 503 after the retries");
    assert_eq!(upstream.hits(), 3, "one try and two retries");

    let response = gateway.post("/api/v1/items/busy").body("{}").send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(upstream.hits(), 4, "a POST without an Idempotency-Key is never sent twice");

    let keyed = gateway.post("/api/v1/items/busy").header("Idempotency-Key", unique()).body("{}").send().await;
    assert_eq!(keyed.unwrap().status(), 503);
    assert_eq!(upstream.hits(), 7, "a keyed POST is safe to repeat");
    assert!(gateway.upstream_metric("gateway_upstream_retries_total", &[("reason", "unavailable")]).await >= 4.0);
}

#[tokio::test]
async fn a_dead_endpoint_is_ejected_and_requests_that_never_left_go_to_the_other_whatever_their_method() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gateway = spawn_gateway(gateway_settings_for(&[&dead, &upstream.address], &key, 1000, 1000), key.clone()).await;

    for i in 0..10 {
        let response = if i % 2 == 0 {
            gateway.get("/api/v1/items/echo").send().await.unwrap()
        } else {
            // Not safe to repeat, but a refused connection means it was never sent.
            gateway.post("/api/v1/items/echo").json(&json!({"n": i})).send().await.unwrap()
        };
        assert_eq!(response.status(), 200, "request {i}");
    }
    assert_eq!(upstream.hits(), 10, "every request reached the live endpoint, once");
    let dead_endpoint = dead.trim_start_matches("http://");
    let ejections = gateway
        .upstream_metric("gateway_endpoint_ejections_total", &[("endpoint", dead_endpoint), ("reason", "local_origin")])
        .await;
    assert!(ejections >= 1.0, "the dead endpoint was ejected");
    assert_eq!(gateway.upstream_metric("gateway_circuit_state", &[]).await, 0.0, "one dead endpoint never opens it");
}

#[tokio::test]
async fn a_large_streamed_body_that_never_left_is_sent_to_the_other_endpoint() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut settings = gateway_settings_for(&[&dead, &upstream.address], &key, 1000, 1000);
    settings.proxy.health_check.interval_ms = 0;
    let gateway = spawn_gateway(settings, key.clone()).await;
    // Chunked: streamed, never held whole by the gateway.
    for _ in 0..4 {
        let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(vec![b'c'; 32 * 1024]));
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let response = gateway.post("/api/v1/items/echo").body(body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<serde_json::Value>().await.unwrap()["body_bytes"], 128 * 1024);
    }
}

#[tokio::test]
async fn a_request_lost_mid_exchange_is_retried_only_when_safe_to_repeat() {
    let hanging = HangingUpUpstream::start().await;
    let live = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings_for(&[&hanging.address, &live.address], &key, 1000, 1000);
    // Keep the failing endpoint in rotation: this test is about what each request sees.
    settings.proxy.outlier_detection.consecutive_5xx = 1000;
    let gateway = spawn_gateway(settings, key.clone()).await;

    // Each kind of request until a few of them were lost on the hanging-up endpoint first.
    type Request = fn(&crate::helpers::TestGateway) -> reqwest::RequestBuilder;
    let kinds: [(&str, Request, u16); 3] = [
        ("GET", |g| g.get("/api/v1/items/echo"), 200),
        ("keyed POST", |g| g.post("/api/v1/items/echo").header("Idempotency-Key", unique()).body("{}"), 200),
        ("POST", |g| g.post("/api/v1/items/echo").body("{}"), 502),
    ];
    for (kind, request, when_lost) in kinds {
        let mut lost = 0;
        for _ in 0..200 {
            let (received, hits) = (hanging.received(), live.hits());
            let response = request(&gateway).send().await.unwrap();
            let status = response.status().as_u16();
            if hanging.received() == received {
                assert_eq!(status, 200, "{kind} went to the live endpoint");
                continue;
            }
            lost += 1;
            assert_eq!(status, when_lost, "{kind} lost on the way");
            let retried = live.hits() > hits;
            assert_eq!(retried, when_lost == 200, "{kind}: sent again only when safe to repeat");
            if status == 502 {
                assert_problem(response, 502).await;
            }
            if lost == 3 {
                break;
            }
        }
        assert_eq!(lost, 3, "{kind}: the hanging-up endpoint was tried");
    }
    assert!(gateway.upstream_metric("gateway_upstream_retries_total", &[("reason", "connection_lost")]).await >= 6.0);
}

#[tokio::test]
async fn the_breaker_opens_only_when_every_endpoint_fails_and_closes_when_one_comes_back() {
    let key = Key::new();
    let port = free_port();
    let mut settings = gateway_settings(&format!("http://127.0.0.1:{port}"), &key, 1000, 1000);
    settings.proxy.circuit_breaker.consecutive_failures = 3;
    settings.proxy.circuit_breaker.open_ms = 60_000;
    let gateway = spawn_gateway(settings, key.clone()).await;

    for _ in 0..3 {
        assert_problem(gateway.get("/api/v1/items/echo").send().await.unwrap(), 503).await;
    }
    let shed = gateway.get("/api/v1/items/echo").send().await.unwrap();
    assert!(shed.headers().contains_key("retry-after"));
    let problem = assert_problem(shed, 503).await;
    assert!(problem["detail"].as_str().unwrap().contains("circuit open"), "{problem}");
    assert_eq!(gateway.upstream_metric("gateway_circuit_state", &[]).await, 1.0);

    // The upstream comes up on that port: its health check passing closes the breaker long
    // before the open period ends.
    let upstream = TestUpstream::start_on(port);
    let deadline = Deadline::after_secs(10);
    while gateway.get("/api/v1/items/echo").send().await.unwrap().status() != 200 {
        deadline.check("the breaker to close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(upstream.hits() >= 1);
    assert_eq!(gateway.upstream_metric("gateway_circuit_state", &[]).await, 0.0);
}

#[tokio::test]
async fn answers_never_open_the_breaker_even_5xx_from_every_endpoint() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000);
    settings.proxy.circuit_breaker.consecutive_failures = 1;
    let gateway = spawn_gateway(settings, key.clone()).await;
    upstream.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(gateway.get("/api/v1/items/flaky").send().await.unwrap().status(), 500, "passed through");
    }
    assert_eq!(upstream.hits(), 10, "every request reached the upstream");
    assert_eq!(gateway.upstream_metric("gateway_circuit_state", &[]).await, 0.0);
}
