//! GET /v1/items: order, limits, tag filter and keyset pagination.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, spawn_app};

async fn page(app: &TestApp, query: &str) -> Value {
    let response = app.get(&format!("/v1/items{query}")).await;
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.unwrap()
}

fn ids(page: &Value) -> Vec<String> {
    page["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn newest_first_default_limit_and_tag_filter() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for i in 0..23 {
        let tags = if i % 2 == 0 { json!(["even"]) } else { json!(["odd"]) };
        let item: Value =
            app.post_json("/v1/items", &json!({"name": format!("n{i}"), "tags": tags})).await.json().await.unwrap();
        created.push(item["id"].as_str().unwrap().to_owned());
    }
    let first = page(&app, "").await;
    assert_eq!(ids(&first).len(), 20, "default limit");
    let newest_first: Vec<String> = created.iter().rev().take(20).cloned().collect();
    assert_eq!(ids(&first), newest_first);
    assert!(first["next_cursor"].is_string());

    let all = page(&app, "?limit=100").await;
    assert_eq!(ids(&all).len(), 23);
    assert!(all["next_cursor"].is_null(), "last page");

    let even = page(&app, "?tag=even&limit=100").await;
    assert_eq!(ids(&even).len(), 12);
    assert!(even["items"].as_array().unwrap().iter().all(|i| i["tags"] == json!(["even"])));
    assert_eq!(ids(&page(&app, "?tag=none").await).len(), 0);
}

#[tokio::test]
async fn bad_parameters_are_400() {
    let app = spawn_app().await;
    for query in [
        "?limit=0",
        "?limit=101",
        "?limit=abc",
        "?limit=-1",
        "?cursor=garbage!",
        "?cursor=bm90LWEtY3Vyc29y",
        "?tag=UPPER",
        "?tag=",
    ] {
        assert_problem(app.get(&format!("/v1/items{query}")).await, 400).await;
    }
}

#[tokio::test]
async fn pages_neither_repeat_nor_drop_items_with_equal_created_at() {
    let app = spawn_app().await;
    // 17 items sharing one created_at, and 5 more around them.
    let db = app.db().await;
    db.batch_execute(
        "INSERT INTO items (id, name, created_at, updated_at) \
         SELECT gen_random_uuid(), 'tied ' || n, '2026-01-01T00:00:00Z', now() FROM generate_series(1, 17) n; \
         INSERT INTO items (id, name, created_at, updated_at) \
         SELECT gen_random_uuid(), 'spread ' || n, '2026-01-01T00:00:00Z'::timestamptz + n * interval '1 second' - interval '3 seconds', now() \
         FROM generate_series(1, 5) n;",
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..20 {
        let query = match &cursor {
            Some(cursor) => format!("?limit=4&cursor={cursor}"),
            None => "?limit=4".to_owned(),
        };
        let current = page(&app, &query).await;
        seen.extend(
            current["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| (i["created_at"].as_str().unwrap().to_owned(), i["id"].as_str().unwrap().to_owned())),
        );
        match current["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 22, "every item exactly once");
    assert_eq!(seen.iter().map(|(_, id)| id).collect::<HashSet<_>>().len(), 22, "no repeats");
    let mut expected = seen.clone();
    expected.sort_by(|a, b| b.cmp(a));
    // Same instant strings compare equal, so this checks newest first, then id descending.
    assert_eq!(seen, expected);
}
