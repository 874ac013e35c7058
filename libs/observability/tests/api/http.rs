//! Request ids on every response, in every log line, and propagated downstream.

use crate::helpers::{LOGS, log_lines_for, spawn_app};

fn response_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"].to_str().expect("ascii").to_owned()
}

fn assert_generated(id: &str) {
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("not a UUID: {id}"));
    assert_eq!(parsed.get_version_num(), 7, "{id}");
}

#[tokio::test]
async fn a_sane_incoming_id_is_kept_and_logged() {
    let app = spawn_app().await;
    let id = "client-id_1.2:3";
    let response = app.client.get(app.route_url("/items/abc")).header("X-Request-ID", id).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response_id(&response), id);

    let lines = log_lines_for(id);
    let handler_line =
        lines.iter().find(|l| l["msg"].as_str().unwrap().ends_with("looked up an item")).expect("handler line");
    assert_eq!(handler_line["level"], 40, "WARN");
    assert_eq!(handler_line["route"], app.route("/items/{id}"));
    let access = lines.iter().find(|l| l["target"] == "access_log").expect("access line");
    assert_eq!(access["status"], 200);
    assert_eq!(access["method"], "GET");
    assert_eq!(access["path"], app.route("/items/abc"));
    assert!(access["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(lines.len(), 2, "exactly the handler line and one access line: {lines:?}");
}

#[tokio::test]
async fn unsafe_or_oversized_incoming_ids_are_replaced() {
    let app = spawn_app().await;
    for bad in ["", "has space", "semi;colon", &"x".repeat(129), "quote\"d"] {
        let response = app.client.get(app.route_url("/items/a")).header("X-Request-ID", bad).send().await.unwrap();
        let id = response_id(&response);
        assert_ne!(id, bad);
        assert_generated(&id);
    }
    let response = app.get(&app.route("/items/a")).await;
    assert_generated(&response_id(&response));
}

#[tokio::test]
async fn error_responses_carry_the_id_too() {
    let app = spawn_app().await;

    let not_found = app.get("/no/such/route").await;
    assert_eq!(not_found.status(), 404);
    assert_generated(&response_id(&not_found));

    let broken = app.get(&app.route("/broken")).await;
    assert_eq!(broken.status(), 500);
    let id = response_id(&broken);
    let access = log_lines_for(&id).into_iter().find(|l| l["target"] == "access_log").expect("access line");
    assert_eq!(access["level"], 50, "5xx are logged as errors");
    assert_eq!(access["error"], "database password is wrong", "the cause is in the log with the id");

    let refused = app.client.get(app.route_url("/items/a")).header("x-fail-in-middleware", "1").send().await.unwrap();
    assert_eq!(refused.status(), 403);
    let id = response_id(&refused);
    assert_generated(&id);
    let access = log_lines_for(&id).into_iter().find(|l| l["target"] == "access_log").expect("access line");
    assert_eq!(access["status"], 403);
}

#[tokio::test]
async fn handlers_extract_the_id_and_propagate_it_with_traceparent() {
    let app = spawn_app().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = app
        .client
        .get(app.route_url("/echo-context"))
        .header("X-Request-ID", "abc")
        .header("traceparent", traceparent)
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["extracted"], "abc");
    assert_eq!(body["propagated"]["x-request-id"], "abc");
    assert_eq!(body["propagated"]["traceparent"], traceparent);

    let response =
        app.client.get(app.route_url("/echo-context")).header("traceparent", "garbage").send().await.unwrap();
    let id = response_id(&response);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["propagated"]["x-request-id"], id.as_str());
    assert!(body["propagated"].get("traceparent").is_none(), "malformed traceparent is not forwarded");
}

#[tokio::test]
async fn every_line_is_a_bunyan_object_and_no_span_lines_are_written() {
    let app = spawn_app().await;
    app.get(&app.route("/items/x")).await;
    app.get("/health").await;
    let lines = LOGS.lines();
    assert!(!lines.is_empty());
    for line in &lines {
        for field in ["name", "service", "version", "environment", "level", "msg", "time", "v", "pid", "hostname"] {
            assert!(line.get(field).is_some(), "missing {field}: {line}");
        }
        let msg = line["msg"].as_str().unwrap();
        assert!(!msg.ends_with("- START]") && !msg.ends_with("- END]"), "span line: {line}");
    }
}
