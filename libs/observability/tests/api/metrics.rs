//! The HTTP metrics: names, labels, the histogram, the gauge, and a clean exposition.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::helpers::{TestApp, metric_value, spawn_app};

const REQUESTS: &str = "api_requests_total";

async fn requests(app: &TestApp, method: &str, endpoint: &str, status: &str) -> f64 {
    app.metric(REQUESTS, &[("method", method), ("endpoint", endpoint), ("status", status)]).await.unwrap_or(0.0)
}

/// Polls `condition` on the metrics text until it holds or `within` passes.
async fn wait_for_metrics(app: &TestApp, within: Duration, condition: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = app.metrics_text().await;
        if condition(&text) || Instant::now() > deadline {
            return text;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn requests_are_counted_by_route_template_and_status() {
    let app = spawn_app().await;
    for id in ["a", "b", "c"] {
        assert_eq!(app.get(&app.route(&format!("/items/{id}"))).await.status(), 200);
    }
    assert_eq!(requests(&app, "GET", &app.route("/items/{id}"), "200").await, 3.0);
    let text = app.metrics_text().await;
    assert!(!text.contains("/items/a"), "raw paths never become labels");
}

#[tokio::test]
async fn unmatched_paths_and_odd_methods_share_fixed_labels() {
    let app = spawn_app().await;
    // `unmatched` is every app's label: other tests in this process may add to it.
    let before = requests(&app, "GET", "unmatched", "404").await;
    for i in 0..5 {
        assert_eq!(app.get(&format!("/scan/{i}/wp-login.php")).await.status(), 404);
    }
    let odd = reqwest::Method::from_bytes(b"BREW").unwrap();
    app.client.request(odd, app.route_url("/items/a")).send().await.unwrap();

    assert!(requests(&app, "GET", "unmatched", "404").await >= before + 5.0);
    let text = app.metrics_text().await;
    assert!(!text.contains("wp-login"), "{text}");
    assert!(!text.contains("BREW"));
    assert!(text.contains("method=\"OTHER\""));
}

#[tokio::test]
async fn errors_from_handlers_and_middleware_are_counted() {
    let app = spawn_app().await;
    assert_eq!(app.get(&app.route("/broken")).await.status(), 500);
    let refused = app.client.get(app.route_url("/items/z")).header("x-fail-in-middleware", "1").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(requests(&app, "GET", &app.route("/broken"), "500").await, 1.0);
    assert_eq!(requests(&app, "GET", &app.route("/items/{id}"), "403").await, 1.0);
}

#[tokio::test]
async fn durations_are_a_histogram_from_1ms_to_10s() {
    let app = spawn_app().await;
    app.get(&app.route("/items/a")).await;
    app.get(&app.route("/items/b")).await;
    let text = app.metrics_text().await;
    assert!(text.contains("# TYPE api_request_duration_seconds histogram"), "{text}");
    let endpoint = app.route("/items/{id}");
    let labels = |le: &'static str| [("method", "GET"), ("endpoint", endpoint.as_str()), ("le", le)];
    for le in ["0.001", "0.005", "0.1", "1", "10"] {
        assert!(metric_value(&text, "api_request_duration_seconds_bucket", &labels(le)).is_some(), "bucket {le}");
    }
    assert_eq!(metric_value(&text, "api_request_duration_seconds_bucket", &labels("+Inf")), Some(2.0));
    let count = metric_value(
        &text,
        "api_request_duration_seconds_count",
        &[("method", "GET"), ("endpoint", endpoint.as_str())],
    );
    assert_eq!(count, Some(2.0));
}

#[tokio::test]
async fn the_active_gauge_comes_back_down_when_the_client_disconnects() {
    let app = spawn_app().await;
    let endpoint = app.route("/wait");
    let active = [("method", "GET"), ("endpoint", endpoint.as_str())];
    let mut stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://")).await.unwrap();
    stream.write_all(format!("GET {endpoint} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();

    let text = wait_for_metrics(&app, Duration::from_secs(10), |t| {
        metric_value(t, "api_active_requests", &active) == Some(1.0)
    })
    .await;
    assert_eq!(metric_value(&text, "api_active_requests", &active), Some(1.0), "request in flight");

    drop(stream);
    let text = wait_for_metrics(&app, Duration::from_secs(10), |t| {
        metric_value(t, "api_active_requests", &active) == Some(0.0)
    })
    .await;
    assert_eq!(metric_value(&text, "api_active_requests", &active), Some(0.0), "gauge back to zero");
    let closed =
        metric_value(&text, REQUESTS, &[("method", "GET"), ("endpoint", endpoint.as_str()), ("status", "499")]);
    assert_eq!(closed, Some(1.0), "counted as client-closed");
}

#[tokio::test]
async fn build_info_and_process_metrics_are_exported() {
    let app = spawn_app().await;
    let response = app.get("/metrics").await;
    assert_eq!(response.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = response.text().await.unwrap();
    assert_eq!(
        metric_value(&text, "app_build_info", &[("service", "observability-test"), ("version", "9.9.9")]),
        Some(1.0)
    );
    for name in ["process_resident_memory_bytes", "process_open_fds", "process_threads", "process_cpu_seconds_total"] {
        assert!(metric_value(&text, name, &[]).is_some(), "{name} missing");
    }
    assert!(metric_value(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let app = spawn_app().await;
    app.get(&app.route("/items/a")).await;
    app.get(&app.route("/broken")).await;
    app.get("/nowhere").await;
    let text = app.metrics_text().await;

    test_support::assert_promtool_accepts(&text);
}
