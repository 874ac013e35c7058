//! Which endpoints take requests: active health checks, the panic threshold, endpoints from
//! DNS. (Balancing by requests in flight is unit-tested in `upstream::endpoints`.)

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;

use crate::helpers::{
    Key, TestGateway, TestResolver, TestUpstream, gateway_settings, gateway_settings_for, metric_sum, spawn_gateway,
    spawn_gateway_with_resolver,
};

fn endpoint_of(upstream: &TestUpstream) -> &str {
    upstream.address.trim_start_matches("http://")
}

async fn wait_until_healthy(gateway: &TestGateway, upstream: &TestUpstream, healthy: bool) {
    let (name, endpoint) = (gateway.upstream.clone(), endpoint_of(upstream).to_owned());
    let wanted = if healthy { 1.0 } else { 0.0 };
    gateway
        .wait_for_metrics("the health check to see the change", |metrics| {
            let labels = [("upstream", name.as_str()), ("endpoint", endpoint.as_str())];
            metrics.contains("gateway_endpoint_healthy")
                && metric_sum(metrics, "gateway_endpoint_healthy", &labels) == wanted
        })
        .await;
}

#[tokio::test]
async fn an_endpoint_failing_its_health_check_leaves_rotation_and_comes_back() {
    let (a, b) = (TestUpstream::start(), TestUpstream::start());
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings_for(&[&a.address, &b.address], &key, 1000, 1000), key.clone()).await;

    // Draining: /ready answers 503 while the instance still serves.
    a.ready.store(false, Ordering::SeqCst);
    wait_until_healthy(&gateway, &a, false).await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
    }
    assert_eq!(a.hits(), before, "no request went to the endpoint out of rotation");
    assert_eq!(gateway.upstream_metric("gateway_upstream_endpoints", &[("state", "in_rotation")]).await, 1.0);

    a.ready.store(true, Ordering::SeqCst);
    wait_until_healthy(&gateway, &a, true).await;
    for _ in 0..40 {
        gateway.get("/api/v1/items/echo").send().await.unwrap();
    }
    assert!(a.hits() > before, "back in rotation");
}

#[tokio::test]
async fn when_every_endpoint_is_unready_every_endpoint_still_serves() {
    // As when the database all instances share is down: each can still serve some requests.
    let (a, b) = (TestUpstream::start(), TestUpstream::start());
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings_for(&[&a.address, &b.address], &key, 1000, 1000), key.clone()).await;
    for upstream in [&a, &b] {
        upstream.ready.store(false, Ordering::SeqCst);
        wait_until_healthy(&gateway, upstream, false).await;
    }
    for _ in 0..40 {
        assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
    }
    assert!(a.hits() > 0 && b.hits() > 0, "both serve: {} and {}", a.hits(), b.hits());
    assert_eq!(gateway.upstream_metric("gateway_upstream_panic", &[]).await, 1.0);
}

#[tokio::test]
async fn a_host_name_is_one_endpoint_per_address_and_follows_the_dns_answer() {
    let (a, b) = (TestUpstream::start(), TestUpstream::start());
    let resolver = TestResolver::default();
    resolver.answer("data-service.test", &[&a.address]);
    let key = Key::new();
    let mut settings = gateway_settings("http://data-service.test:8081", &key, 1000, 1000);
    settings.proxy.dns_refresh_ms = 20;
    let gateway = spawn_gateway_with_resolver(settings, key.clone(), Some(Arc::new(resolver.clone()))).await;

    let echoed: Value = gateway.get("/api/v1/items/echo").send().await.unwrap().json().await.unwrap();
    assert_eq!(echoed["headers"]["host"], "data-service.test:8081", "the upstream is told the name");
    assert_eq!((a.hits(), b.hits()), (1, 0));

    // A new replica appears in the answer: it takes requests.
    resolver.answer("data-service.test", &[&a.address, &b.address]);
    gateway.wait_for_metrics("two endpoints", |m| endpoints_total(m, &gateway.upstream) == 2.0).await;
    // It may not be listening yet: it waits for its first health check.
    wait_until_healthy(&gateway, &b, true).await;
    for _ in 0..40 {
        assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
    }
    assert!(b.hits() > 0, "the new address takes requests");

    // One leaves the answer: it takes none.
    resolver.answer("data-service.test", &[&b.address]);
    gateway.wait_for_metrics("one endpoint", |m| endpoints_total(m, &gateway.upstream) == 1.0).await;
    let before = a.hits();
    for _ in 0..20 {
        assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
    }
    assert_eq!(a.hits(), before, "a removed address takes no request");
}

fn endpoints_total(metrics: &str, upstream: &str) -> f64 {
    metric_sum(metrics, "gateway_upstream_endpoints", &[("upstream", upstream)])
}

#[tokio::test]
async fn a_name_that_does_not_resolve_yet_is_a_503_until_it_does() {
    let a = TestUpstream::start();
    let resolver = TestResolver::default();
    let key = Key::new();
    let mut settings = gateway_settings("http://later.test:8081", &key, 1000, 1000);
    settings.proxy.dns_refresh_ms = 20;
    let gateway = spawn_gateway_with_resolver(settings, key.clone(), Some(Arc::new(resolver.clone()))).await;
    let response = gateway.get("/api/v1/items/echo").send().await.unwrap();
    let problem = crate::helpers::assert_problem(response, 503).await;
    assert!(problem["detail"].as_str().unwrap().contains("no endpoints"), "{problem}");

    resolver.answer("later.test", &[&a.address]);
    gateway.wait_for_metrics("the name to resolve", |m| endpoints_total(m, &gateway.upstream) == 1.0).await;
    assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_endpoint_ejected_for_refusing_connections_is_back_as_soon_as_it_answers() {
    let live = TestUpstream::start();
    let port = crate::helpers::free_port();
    let restarted = format!("http://127.0.0.1:{port}");
    let key = Key::new();
    let settings = gateway_settings_for(&[&restarted, &live.address], &key, 1000, 1000);
    assert_eq!(settings.proxy.outlier_detection.base_ejection_time_ms, 30_000, "ejected for far longer than this test");
    let gateway = spawn_gateway(settings, key.clone()).await;
    // Until the dead endpoint has been tried (and ejected), every request still succeeds.
    let endpoint = format!("127.0.0.1:{port}");
    for _ in 0..50 {
        assert_eq!(gateway.get("/api/v1/items/echo").send().await.unwrap().status(), 200);
        let ejections =
            gateway.upstream_metric("gateway_endpoint_ejections_total", &[("endpoint", endpoint.as_str())]).await;
        if ejections >= 1.0 {
            break;
        }
    }
    assert!(
        gateway.upstream_metric("gateway_endpoint_ejections_total", &[("endpoint", endpoint.as_str())]).await >= 1.0
    );

    // The instance comes (back) up on its address: its health check passes, and it takes
    // requests again long before the 30 s ejection would have ended.
    let back = TestUpstream::start_on(port);
    let deadline = crate::helpers::Deadline::after_secs(10);
    while back.hits() == 0 {
        deadline.check("the restarted endpoint to take requests");
        gateway.get("/api/v1/items/echo").send().await.unwrap();
    }
}
