//! Per-key limits: shared through Redis across replicas, local when Redis is down.

use std::time::Instant;

use crate::helpers::{Key, TestUpstream, assert_problem, free_port, gateway_settings, spawn_gateway};

#[tokio::test]
async fn two_gateways_enforce_one_shared_limit() {
    // Slow key: decided request by request.
    shared_limit_holds(10, 20, 80).await;
}

#[tokio::test]
async fn reservations_never_let_two_gateways_exceed_a_fast_keys_limit() {
    // Fast key: each gateway reserves several requests per Redis call.
    shared_limit_holds(200, 60, 400).await;
}

async fn shared_limit_holds(rate: u32, burst: u32, requests: u32) {
    let upstream = TestUpstream::start();
    let key = Key::new();
    // One prefix: the two gateways share the key's bucket, as replicas do.
    let settings = gateway_settings(&upstream.address, &key, rate, burst);
    let first = spawn_gateway(settings.clone(), key.clone()).await;
    let second = spawn_gateway(settings, key.clone()).await;

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
}

#[tokio::test]
async fn concurrent_requests_share_reservations_without_losing_reserved_requests() {
    // Reservations of 10 requests per Redis call (rate 500/s, burst 100).
    let (rate, burst, requests) = (500, 100, 300);
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, rate, burst), key.clone()).await;

    let started = Instant::now();
    let statuses = futures_util::future::join_all(
        (0..requests).map(|_| async { gateway.get("/api/v1/items/echo").send().await.unwrap().status().as_u16() }),
    )
    .await;
    let refilled = (f64::from(rate) * started.elapsed().as_secs_f64()).ceil() as u32;
    let allowed = statuses.iter().filter(|s| **s == 200).count() as u32;
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    // Every reserved request is admitted or still reserved at the end (at most one and a
    // half reservations): reservations racing each other add up instead of replacing one another.
    assert!(allowed + 15 >= burst.min(requests), "allowed {allowed} of burst {burst}");
    assert!(allowed <= burst + refilled + 1, "allowed {allowed}, burst {burst}, refilled {refilled}");
}

#[tokio::test]
async fn a_refusal_is_remembered_until_redis_said_a_request_would_fit() {
    // One request a second: after the burst, the next fits only about a second later.
    let upstream = TestUpstream::start();
    let key = Key::new();
    let settings = gateway_settings(&upstream.address, &key, 1, 2);
    let prefix = settings.rate_limit.key_prefix.clone();
    let first = spawn_gateway(settings.clone(), key.clone()).await;
    for _ in 0..2 {
        assert_eq!(first.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
    }
    let refused_at = Instant::now();
    let refused = first.get("/api/v1/items/echo").send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();

    // Empty the shared bucket: only a replica that remembers the refusal still refuses.
    drop(test_support::RedisNamespace { prefix });
    let second = spawn_gateway(settings, key.clone()).await;
    let remembered = first.get("/api/v1/items/echo").send().await.unwrap().status();
    let asked = second.get("/api/v1/items/echo").send().await.unwrap().status();
    if refused_at.elapsed() < std::time::Duration::from_millis(900) {
        assert_eq!(remembered, 429, "the refusal holds for its Retry-After ({retry_after} s) without asking Redis");
    }
    assert_eq!(asked, 200, "Redis itself no longer refuses");
}

#[tokio::test]
async fn without_redis_each_replica_limits_locally_and_keeps_serving() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1, 5);
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
