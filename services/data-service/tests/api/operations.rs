//! The operational surface: OpenAPI document, metrics, health.

use serde_json::{Value, json};

use crate::helpers::{metric_sum, spawn_app, spawn_app_with, test_settings};

#[tokio::test]
async fn openapi_documents_every_operation_and_status() {
    let app = spawn_app().await;
    let document: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"), "{}", document["openapi"]);
    let expected: [(&str, &str, &[&str]); 5] = [
        ("/v1/items", "post", &["201", "400", "409", "413", "415", "422", "503"]),
        ("/v1/items", "get", &["200", "400", "503"]),
        ("/v1/items/{id}", "get", &["200", "304", "400", "404", "503"]),
        ("/v1/items/{id}", "patch", &["200", "400", "404", "412", "413", "415", "422", "503"]),
        ("/v1/items/{id}", "delete", &["204", "400", "404", "412", "503"]),
    ];
    for (path, method, statuses) in expected {
        let responses = &document["paths"][path][method]["responses"];
        for status in statuses {
            assert!(responses.get(status).is_some(), "{method} {path} {status}");
        }
    }
    for schema in ["Item", "NewItem", "ItemPatch", "ItemPage", "ProblemDocument"] {
        assert!(document["components"]["schemas"].get(schema).is_some(), "{schema}");
    }
}

#[tokio::test]
async fn service_metrics_are_exported_and_pass_promtool() {
    let app = spawn_app().await;
    let item = app.create("m").await;
    let path = format!("/v1/items/{}", item["id"].as_str().unwrap());
    app.get(&path).await;
    app.get(&path).await;
    // The recorder is the process's: other tests in this process (under `cargo test`) count
    // into the same series, so only what this test adds is asserted.
    let patches = |text: &str| {
        metric_sum(
            text,
            "api_requests_total",
            &[("endpoint", "/v1/items/{id}"), ("method", "PATCH"), ("status", "200")],
        )
    };
    let patches_before = patches(&app.metrics().await);
    app.patch_json(&path, &json!({"name": "n"}), None).await;
    let text = app.metrics().await;

    // pool_size 16 shared out between the 2 workers, and 2 for background work.
    assert_eq!(metric_sum(&text, "db_pool_connections", &[("state", "max")]), 18.0);
    assert!(metric_sum(&text, "db_pool_connections", &[("state", "open")]) >= 1.0);
    assert!(text.contains("db_pool_waiting"));
    assert!(metric_sum(&text, "db_query_duration_seconds_count", &[("operation", "create_item")]) >= 1.0);
    assert!(
        metric_sum(&text, "db_query_duration_seconds_bucket", &[("operation", "patch_item"), ("le", "0.001")]) >= 0.0
    );
    assert!(text.contains("cache_hits_total") && text.contains("cache_misses_total"));
    assert!(patches(&text) >= patches_before + 1.0, "the PATCH is counted by route template and status");

    test_support::assert_promtool_accepts(&text);
}

#[tokio::test]
async fn readiness_reports_postgres_and_redis() {
    let app = spawn_app().await;
    let response = app.get("/ready").await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["checks"]["postgres"]["critical"], true);
    assert_eq!(body["checks"]["redis"]["critical"], false);
    assert_eq!(body["checks"]["redis"]["status"], "pass");
}

#[tokio::test]
async fn the_healthcheck_subcommand_reports_whether_the_service_answers() {
    let app = spawn_app().await;
    let port = app.address.rsplit(':').next().unwrap().parse().unwrap();
    tokio::task::spawn_blocking(move || {
        test_support::assert_healthcheck_subcommand(env!("CARGO_BIN_EXE_data-service"), port)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_database_password_can_come_from_a_file_and_a_missing_file_is_a_clear_error() {
    let file = std::env::temp_dir().join(format!("stackline-test-password-{}", uuid::Uuid::new_v4().simple()));
    // The test server trusts local connections, so any password works; the file must be read.
    std::fs::write(&file, "not-a-real-password\n").unwrap();
    let mut settings = test_settings();
    settings.database.password_file = file.display().to_string();
    let app = spawn_app_with(settings).await;
    assert_eq!(app.get("/ready").await.status(), 200);
    std::fs::remove_file(&file).unwrap();

    let mut settings = test_settings();
    settings.database.password_file = file.display().to_string();
    let service = observability::ServiceInfo { name: "data-service", version: "test", environment: "test".to_owned() };
    match data_service::startup::Application::build(settings, service).await {
        Err(error) => assert!(error.to_string().contains("database.password_file"), "{error}"),
        Ok(_) => panic!("an unreadable password file must stop the start"),
    }
}
