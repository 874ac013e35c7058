//! Postgres outages and concurrent migrations.

use std::time::Duration;

use serde_json::{Value, json};

use data_service::configuration::Settings;

use crate::helpers::{Deadline, LOGS, TcpProxy, assert_problem, database_of, spawn_app_with, test_settings};

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
    let settings = test_settings();
    let _database = database_of(&settings);
    data_service::db::create_database_if_missing(&settings.database).await.unwrap();
    let runs = (0..4).map(|_| data_service::db::migrate(&settings.database));
    let applied: Vec<usize> = futures_util::future::join_all(runs).await.into_iter().map(Result::unwrap).collect();
    assert_eq!(applied.iter().sum::<usize>(), 3, "three migrations, applied once in all: {applied:?}");
    let versions: i64 =
        connect(&settings).await.query_one("SELECT count(*) FROM refinery_schema_history", &[]).await.unwrap().get(0);
    assert_eq!(versions, 3);
}

#[tokio::test]
async fn a_failed_migration_names_postgres_reason() {
    let settings = test_settings();
    let _database = database_of(&settings);
    data_service::db::create_database_if_missing(&settings.database).await.unwrap();
    data_service::db::migrate_to(&settings.database, refinery::Target::Version(2)).await.unwrap();
    connect(&settings).await.batch_execute("CREATE TABLE item_tags (tag text)").await.unwrap();
    let error = data_service::db::migrate(&settings.database).await.unwrap_err().to_string();
    assert!(error.contains("V3__index_items_by_tag"), "{error}");
    assert!(error.contains("relation \"item_tags\" already exists"), "{error}");
}

async fn connect(settings: &Settings) -> tokio_postgres::Client {
    let url = secrecy::ExposeSecret::expose_secret(&settings.database.url).to_owned();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}
