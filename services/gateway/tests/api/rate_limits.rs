//! Per-key limits: shared through Redis across replicas, local when Redis is down.

use std::time::Instant;

use crate::helpers::{Key, TestUpstream, assert_problem, free_port, gateway_settings, spawn_gateway, unique};

#[tokio::test]
async fn two_gateways_enforce_one_shared_limit() {
    // Slow key: decided request by request.
    shared_limit_holds(10, 20, 80).await;
}

#[tokio::test]
async fn leases_never_let_two_gateways_exceed_a_fast_keys_limit() {
    // Fast key: each gateway reserves several requests per Redis call.
    shared_limit_holds(200, 60, 400).await;
}

async fn shared_limit_holds(rate: u32, burst: u32, requests: u32) {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let prefix = format!("test:rl:{}:", unique());
    let first = spawn_gateway(gateway_settings(&upstream.address, &key, rate, burst, &prefix), key.clone()).await;
    let second = spawn_gateway(gateway_settings(&upstream.address, &key, rate, burst, &prefix), key.clone()).await;

    let started = Instant::now();
    let mut allowed = 0u32;
    for i in 0..requests {
        let gateway = if i % 2 == 0 { &first } else { &second };
        let response = gateway.get("/api/v1/items/echo").send().await.unwrap();
        match response.status().as_u16() {
            200 => allowed += 1,
            429 => {
                let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry_after >= 1);
                assert_eq!(response.headers()["ratelimit-remaining"], "0");
                assert_eq!(response.headers()["ratelimit-limit"], burst.to_string().as_str());
                assert_problem(response, 429).await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // One bucket: the burst plus what the rate refilled while the test ran; two separate
    // buckets would have let through about twice the burst.
    let refilled = (f64::from(rate) * started.elapsed().as_secs_f64()).ceil() as u32;
    assert!(allowed >= burst, "allowed {allowed}");
    assert!(allowed <= burst + refilled + 1, "allowed {allowed}, burst {burst}, refilled {refilled}");
    let metrics = first.metrics().await;
    assert!(
        metrics.contains(&format!("gateway_ratelimit_decisions_total{{key_id=\"{}\",decision=\"limited\"}}", key.id)),
        "{metrics}"
    );

    test_support::delete_redis_keys(&prefix);
}

#[tokio::test]
async fn without_redis_each_replica_limits_locally_and_keeps_serving() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1, 5, &unique());
    settings.rate_limit.redis_url = secrecy::SecretString::from(format!("redis://127.0.0.1:{}/0", free_port()));
    let gateway = spawn_gateway(settings, key.clone()).await;

    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(gateway.get("/api/v1/items/echo").send().await.unwrap().status().as_u16());
    }
    assert_eq!(&statuses[..5], &[200; 5], "still serving: {statuses:?}");
    assert!(statuses[5..].contains(&429), "and still limiting: {statuses:?}");
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("decision=\"allowed_local\""), "{metrics}");
    assert!(metrics.contains("gateway_ratelimit_redis_errors_total"));
    let ready: serde_json::Value =
        reqwest::get(format!("{}/ready", gateway.admin)).await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready", "Redis is not critical for the gateway");
    assert_eq!(ready["checks"]["redis"]["status"], "fail");
}
