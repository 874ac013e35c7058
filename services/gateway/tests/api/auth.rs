//! API keys.

use crate::helpers::{Key, LOGS, TestUpstream, assert_problem, gateway_settings, spawn_gateway, unique};

#[tokio::test]
async fn requests_without_a_valid_key_get_401_with_www_authenticate() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 100, 100, &unique()), key.clone()).await;

    let cases =
        [None, Some("Bearer wrong-key"), Some("Basic dXNlcjpwYXNz"), Some("Bearer "), Some(key.secret.as_str())];
    for authorization in cases {
        let mut request = gateway.client.get(gateway.url("/api/v1/items/echo"));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{authorization:?}");
        assert_problem(response, 401).await;
    }
    assert_eq!(upstream.hits.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the upstream");

    let ok = gateway.get("/api/v1/items/echo").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("gateway_auth_failures_total{reason=\"missing\"} 1"), "{metrics}");
    assert!(metrics.contains("gateway_auth_failures_total{reason=\"unknown\"} 1"));
    test_support::assert_promtool_accepts(&metrics);

    // The key id is logged with the request; the key itself never is.
    let text = LOGS.text();
    assert!(text.contains(&format!("\"client\":\"{}\"", key.id)), "key id in the access log");
    assert!(!text.contains(&key.secret), "the key never appears in a log line");
    assert!(!text.contains("wrong-key") && !text.contains("dXNlcjpwYXNz"));
}
