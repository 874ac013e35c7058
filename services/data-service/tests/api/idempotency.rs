//! Idempotency-Key: replays, conflicts, and exactly-once under concurrency.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn a_repeat_returns_the_first_response() {
    let app = spawn_app().await;
    let send =
        |body: Value| app.client.post(app.url("/v1/items")).header("Idempotency-Key", "order-1").json(&body).send();
    let first = send(json!({"name": "once", "tags": ["a"]})).await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();

    // Same JSON value, other key order and spacing.
    let again = app
        .client
        .post(app.url("/v1/items"))
        .header("Idempotency-Key", "order-1")
        .header("content-type", "application/json")
        .body(r#"{ "tags": ["a"], "name": "once" }"#)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], location);
    assert_eq!(again.headers()["etag"], "\"1\"");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    // The key's lock ends with the response, so an immediate next request is not "in flight".
    let held: i64 = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND d.datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "an advisory lock outlived its response");

    let different = send(json!({"name": "other"})).await.unwrap();
    assert_problem(different, 422).await;

    let count: i64 = app.db().await.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(count, 1);
    assert!(crate::helpers::metric_sum(&app.metrics().await, "idempotent_replays_total", &[]) >= 1.0);
}

#[tokio::test]
async fn keys_are_stored_with_an_expiry_and_bad_keys_are_rejected() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/v1/items"))
        .header("Idempotency-Key", "k-2")
        .json(&json!({"name": "n"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let hours: f64 = app
        .db()
        .await
        .query_one(
            "SELECT extract(epoch FROM expires_at - created_at)::float8 / 3600 FROM idempotency_keys WHERE key = 'k-2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!((hours - 24.0).abs() < 0.01, "{hours}");

    let long = "k".repeat(256);
    let response = app
        .client
        .post(app.url("/v1/items"))
        .header("Idempotency-Key", long)
        .json(&json!({"name": "n"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 400).await;
}

#[tokio::test]
async fn an_expired_key_starts_afresh() {
    let app = spawn_app().await;
    let send =
        || app.client.post(app.url("/v1/items")).header("Idempotency-Key", "old").json(&json!({"name": "n"})).send();
    let first: Value = send().await.unwrap().json().await.unwrap();
    app.db().await.execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'", &[]).await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(second.status(), 201);
    assert!(second.headers().get("idempotent-replayed").is_none());
    assert_ne!(second.json::<Value>().await.unwrap()["id"], first["id"]);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_create_exactly_one_item() {
    let app = spawn_app().await;
    let attempts = (0..16).map(|_| {
        app.client.post(app.url("/v1/items")).header("Idempotency-Key", "race").json(&json!({"name": "raced"})).send()
    });
    let responses = futures_util::future::join_all(attempts).await;
    let mut ids = std::collections::HashSet::new();
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            201 => {
                ids.insert(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
            }
            409 => {
                assert_eq!(response.headers()["retry-after"], "1");
                assert_problem(response, 409).await;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(ids.len(), 1, "every 201 names the same item");
    let count: i64 = app.db().await.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
    assert_eq!(count, 1);
}
