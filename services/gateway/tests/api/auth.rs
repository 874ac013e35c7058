//! API keys.

use crate::helpers::{Key, LOGS, TestUpstream, assert_problem, gateway_settings, metric_sum, spawn_gateway};

#[tokio::test]
async fn requests_without_a_valid_key_get_401_with_www_authenticate() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 100, 100), key.clone()).await;

    let failures = |metrics: &str, reason| metric_sum(metrics, "gateway_auth_failures_total", &[("reason", reason)]);
    let before = gateway.metrics().await;
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
    // Counted process-wide (other tests' gateways count too): at least this test's.
    let metrics = gateway.metrics().await;
    assert!(failures(&metrics, "missing") >= failures(&before, "missing") + 1.0, "{metrics}");
    assert!(failures(&metrics, "unknown") >= failures(&before, "unknown") + 1.0, "{metrics}");
    assert!(failures(&metrics, "malformed") >= failures(&before, "malformed") + 3.0, "{metrics}");
    test_support::assert_promtool_accepts(&metrics);

    // The key id is logged with the request; the key itself never is.
    let text = LOGS.text();
    assert!(text.contains(&format!("\"client\":\"{}\"", key.id)), "key id in the access log");
    assert!(!text.contains(&key.secret), "the key never appears in a log line");
    assert!(!text.contains("wrong-key") && !text.contains("dXNlcjpwYXNz"));
}
