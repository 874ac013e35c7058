//! Postgres outages and concurrent migrations.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Deadline, LOGS, POSTGRES, TcpProxy, assert_problem, spawn_app_with, test_settings};

#[tokio::test]
async fn postgres_down_means_fast_503_problems_and_recovery_without_restart() {
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = test_settings();
    let database = secrecy::ExposeSecret::expose_secret(&settings.database.url).rsplit('/').next().unwrap().to_owned();
    settings.database.url = secrecy::SecretString::from(format!("postgres://postgres@{}/{database}", proxy.address));
    let app = spawn_app_with(settings).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    assert_eq!(app.post_json("/v1/items", &json!({"name": "before"})).await.status(), 201);

    proxy.set_up(false);
    let response =
        client.post(app.url("/v1/items")).json(&json!({"name": "during"})).send().await.expect("an answer, not a hang");
    assert_eq!(response.headers()["retry-after"], "1");
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let problem = assert_problem(response, 503).await;
    assert_eq!(problem["detail"], "the database is unavailable; retry shortly", "no driver detail leaks");
    let logged = LOGS.lines().into_iter().any(|l| l["request_id"] == request_id.as_str() && l["cause"].is_string());
    assert!(logged, "the cause is logged with the request id");

    assert_problem(client.get(app.url("/v1/items")).send().await.unwrap(), 503).await;
    let ready = client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["postgres"]["status"], "fail", "{ready}");
    assert_eq!(client.get(app.url("/health")).send().await.unwrap().status(), 200, "liveness does not care");

    proxy.set_up(true);
    let deadline = Deadline::after_secs(20);
    while client.get(app.url("/ready")).send().await.unwrap().status() != 200 {
        deadline.check("readiness after Postgres came back");
    }
    assert_eq!(app.post_json("/v1/items", &json!({"name": "after"})).await.status(), 201);
    let page: Value = app.get("/v1/items").await.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn replicas_migrating_at_once_apply_each_migration_once() {
    let mut settings = test_settings();
    settings.database.migrate_on_start = false;
    let database = settings.database.clone();
    data_service::db::create_database_if_missing(&database).await.unwrap();
    let runs = (0..4).map(|_| data_service::db::migrate(&database));
    let applied: Vec<usize> = futures_util::future::join_all(runs).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(applied.iter().sum::<usize>(), 2, "two migrations, applied once in all: {applied:?}");

    let name = secrecy::ExposeSecret::expose_secret(&database.url).rsplit('/').next().unwrap().to_owned();
    let (client, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/{name}"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let versions: i64 = client.query_one("SELECT count(*) FROM refinery_schema_history", &[]).await.unwrap().get(0);
    assert_eq!(versions, 2);
    drop(client);
    let (admin, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/postgres"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    admin.batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)")).await.unwrap();
}
