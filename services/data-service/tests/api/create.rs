//! POST /v1/items: the success shape, every field rule, and the protocol errors.

use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn create_returns_201_with_location_etag_and_the_normalised_item() {
    let app = spawn_app().await;
    let response = app
        .post_json(
            "/v1/items",
            &json!({"name": "  Widget  ", "description": "d", "tags": ["b", "a", "b"], "attributes": {"colour": "red"}}),
        )
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["etag"], "\"1\"");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let item: Value = response.json().await.unwrap();
    let id = item["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/items/{id}"));
    assert!(uuid::Uuid::parse_str(id).is_ok());
    assert_eq!(item["name"], "Widget");
    assert_eq!(item["description"], "d");
    assert_eq!(item["tags"], json!(["b", "a"]));
    assert_eq!(item["attributes"], json!({"colour": "red"}));
    assert_eq!(item["version"], 1);
    for field in ["created_at", "updated_at"] {
        let text = item[field].as_str().unwrap();
        assert!(text.ends_with('Z'), "UTC: {text}");
        assert!(time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).is_ok());
    }
    let fetched: Value = app.get(&location).await.json().await.unwrap();
    assert_eq!(fetched, item);
}

#[tokio::test]
async fn optional_fields_have_defaults() {
    let app = spawn_app().await;
    let item = app.create("plain").await;
    assert_eq!(item["description"], "");
    assert_eq!(item["tags"], json!([]));
    assert_eq!(item["attributes"], json!({}));
}

#[tokio::test]
async fn every_field_rule_is_enforced() {
    let app = spawn_app().await;
    let many_tags: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let cases: Vec<(Value, u16)> = vec![
        (json!({}), 422),
        (json!({"name": ""}), 422),
        (json!({"name": "   "}), 422),
        (json!({"name": "n".repeat(201)}), 422),
        (json!({"name": 7}), 422),
        (json!({"name": null}), 422),
        (json!({"name": "x", "description": "d".repeat(10_001)}), 422),
        (json!({"name": "x", "tags": many_tags}), 422),
        (json!({"name": "x", "tags": ["Upper"]}), 422),
        (json!({"name": "x", "tags": ["sp ace"]}), 422),
        (json!({"name": "x", "tags": [""]}), 422),
        (json!({"name": "x", "tags": ["t".repeat(65)]}), 422),
        (json!({"name": "x", "tags": "a"}), 422),
        (json!({"name": "x", "attributes": []}), 422),
        (json!({"name": "x", "attributes": {"k": "v".repeat(16 * 1024)}}), 422),
        (json!({"name": "x", "unknown": 1}), 400),
        (json!(["name"]), 400),
    ];
    for (body, status) in cases {
        let response = app.post_json("/v1/items", &body).await;
        let shown = body.to_string().chars().take(80).collect::<String>();
        assert_eq!(response.status().as_u16(), status, "{shown}");
        assert_problem(response, status).await;
    }
    // The limits themselves are accepted.
    let edge = json!({"name": "é".repeat(200), "description": "d".repeat(10_000), "tags": (0..32).map(|i| format!("t-{i}:x_y.z")).collect::<Vec<_>>()});
    assert_eq!(app.post_json("/v1/items", &edge).await.status(), 201);
}

#[tokio::test]
async fn protocol_errors_are_problems() {
    let app = spawn_app().await;
    let malformed = app
        .client
        .post(app.url("/v1/items"))
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .unwrap();
    assert_problem(malformed, 400).await;

    let no_type = app.client.post(app.url("/v1/items")).body(r#"{"name":"x"}"#).send().await.unwrap();
    assert_problem(no_type, 415).await;
    let text = app
        .client
        .post(app.url("/v1/items"))
        .header("content-type", "text/plain")
        .body(r#"{"name":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_problem(text, 415).await;

    let huge = json!({"name": "x", "description": "d".repeat(70 * 1024)});
    let too_large = app.post_json("/v1/items", &huge).await;
    assert_problem(too_large, 413).await;

    let unknown_route = app.get("/v2/things").await;
    assert_problem(unknown_route, 404).await;

    let wrong_method = app.client.put(app.url("/v1/items")).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD, POST");
    assert_problem(wrong_method, 405).await;
    let wrong_method = app.client.post(app.url(&format!("/v1/items/{}", uuid::Uuid::new_v4()))).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET, HEAD, PATCH, DELETE");
    assert_problem(wrong_method, 405).await;
}

#[tokio::test]
async fn the_callers_request_id_is_echoed_and_in_problems() {
    let app = spawn_app().await;
    let response =
        app.client.get(app.url("/v1/items/not-a-uuid")).header("X-Request-ID", "trace-me-42").send().await.unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let problem = assert_problem(response, 400).await;
    assert_eq!(problem["request_id"], "trace-me-42");
}

#[tokio::test]
async fn json_numbers_and_unicode_survive_the_round_trip_through_jsonb() {
    let app = spawn_app().await;
    let attributes =
        json!({"max": f64::MAX, "tiny": 1e-320, "neg": -4.5e16, "big_int": 12_345_678_901_234_567_i64, "ünï": "😀"});
    let response = app.post_json("/v1/items", &json!({"name": "numbers", "attributes": attributes})).await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let fetched: Value = app.get(&format!("/v1/items/{}", created["id"].as_str().unwrap())).await.json().await.unwrap();
    // Postgres keeps numbers as exact decimals: -4.5e16 may come back written as an integer.
    for returned in [&created["attributes"], &fetched["attributes"]] {
        for (key, sent) in attributes.as_object().unwrap() {
            match sent {
                Value::Number(n) => assert_eq!(returned[key].as_f64(), n.as_f64(), "{key}"),
                other => assert_eq!(&returned[key], other, "{key}"),
            }
        }
    }
    assert_eq!(fetched["attributes"]["big_int"].as_i64(), Some(12_345_678_901_234_567), "integers stay exact");
    let nul = app.post_json("/v1/items", &json!({"name": "x", "attributes": {"k": "a\u{0}b"}})).await;
    assert_problem(nul, 422).await;
}
