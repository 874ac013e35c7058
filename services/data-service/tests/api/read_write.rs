//! GET, PATCH and DELETE by id, with their preconditions.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn get_answers_etag_304_404_and_400() {
    let app = spawn_app().await;
    let item = app.create("thing").await;
    let path = format!("/v1/items/{}", item["id"].as_str().unwrap());

    let response = app.get(&path).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"1\"");
    assert_eq!(response.headers()["content-type"], "application/json");

    for tag in ["\"1\"", "W/\"1\"", "\"7\", \"1\"", "*"] {
        let response = app.client.get(app.url(&path)).header("If-None-Match", tag).send().await.unwrap();
        assert_eq!(response.status(), 304, "{tag}");
        assert_eq!(response.headers()["etag"], "\"1\"");
    }
    let stale = app.client.get(app.url(&path)).header("If-None-Match", "\"2\"").send().await.unwrap();
    assert_eq!(stale.status(), 200);

    assert_problem(app.get(&format!("/v1/items/{}", uuid::Uuid::new_v4())).await, 404).await;
    for bad in ["not-a-uuid", "123", "0b6a6b0e6f2c4c1e9a9a1a2b3c4d5e6f"] {
        assert_problem(app.get(&format!("/v1/items/{bad}")).await, 400).await;
    }
}

#[tokio::test]
async fn patch_changes_the_given_fields_and_bumps_the_version() {
    let app = spawn_app().await;
    let item = app.create("before").await;
    let path = format!("/v1/items/{}", item["id"].as_str().unwrap());

    let response = app.patch_json(&path, &json!({"name": " after ", "tags": ["x", "x"]}), Some("\"1\"")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let patched: Value = response.json().await.unwrap();
    assert_eq!(patched["name"], "after");
    assert_eq!(patched["tags"], json!(["x"]));
    assert_eq!(patched["description"], item["description"], "untouched");
    assert_eq!(patched["created_at"], item["created_at"]);
    assert_ne!(patched["updated_at"], item["updated_at"]);
    assert_eq!(patched["version"], 2);

    // Without If-Match, or with *, any version goes.
    let response = app.patch_json(&path, &json!({"attributes": {"a": 1}}), None).await;
    assert_eq!(response.json::<Value>().await.unwrap()["version"], 3);
    let response = app.patch_json(&path, &json!({"description": "d"}), Some("*")).await;
    assert_eq!(response.json::<Value>().await.unwrap()["version"], 4);

    // A patch that changes nothing is not a change.
    let response = app.patch_json(&path, &json!({"description": "d"}), None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"4\"");

    // merge-patch is accepted too.
    let response = app
        .client
        .patch(app.url(&path))
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"name":"merged"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(app.get(&path).await.json::<Value>().await.unwrap()["name"], "merged");
}

#[tokio::test]
async fn patch_rejections() {
    let app = spawn_app().await;
    let item = app.create("x").await;
    let path = format!("/v1/items/{}", item["id"].as_str().unwrap());

    assert_problem(app.patch_json(&path, &json!({"name": "y"}), Some("\"9\"")).await, 412).await;
    assert_problem(app.patch_json(&path, &json!({"name": "y"}), Some("W/\"1\"")).await, 412).await;
    assert_problem(app.patch_json(&path, &json!({"id": "y"}), None).await, 400).await;
    assert_problem(app.patch_json(&path, &json!({"name": ""}), None).await, 422).await;
    assert_problem(app.patch_json(&path, &json!({"tags": null}), None).await, 422).await;
    let missing = format!("/v1/items/{}", uuid::Uuid::new_v4());
    assert_problem(app.patch_json(&missing, &json!({"name": "y"}), None).await, 404).await;
    assert_problem(app.patch_json("/v1/items/nope", &json!({"name": "y"}), None).await, 400).await;
    let text = app.client.patch(app.url(&path)).header("content-type", "text/plain").body("{}").send().await.unwrap();
    assert_problem(text, 415).await;
    // Nothing above changed the item.
    assert_eq!(app.get(&path).await.headers()["etag"], "\"1\"");
}

#[tokio::test]
async fn delete_honours_if_match_and_then_the_item_is_gone() {
    let app = spawn_app().await;
    let item = app.create("doomed").await;
    let path = format!("/v1/items/{}", item["id"].as_str().unwrap());

    let mismatch = app.client.delete(app.url(&path)).header("If-Match", "\"2\"").send().await.unwrap();
    assert_problem(mismatch, 412).await;
    let deleted = app.client.delete(app.url(&path)).header("If-Match", "\"1\"").send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_problem(app.get(&path).await, 404).await;
    assert_problem(app.client.delete(app.url(&path)).send().await.unwrap(), 404).await;
    assert_problem(app.client.delete(app.url("/v1/items/nope")).send().await.unwrap(), 400).await;
}

#[tokio::test]
async fn concurrent_patches_with_the_same_if_match_have_one_winner() {
    let app = spawn_app().await;
    let item = app.create("contended").await;
    let path = format!("/v1/items/{}", item["id"].as_str().unwrap());

    let bodies: Vec<Value> = (0..12).map(|i| json!({"name": format!("writer {i}")})).collect();
    let attempts = bodies.iter().map(|body| app.patch_json(&path, body, Some("\"1\"")));
    let statuses: Vec<u16> =
        futures_util::future::join_all(attempts).await.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 11, "{statuses:?}");
    assert_eq!(app.get(&path).await.json::<Value>().await.unwrap()["version"], 2);
}
