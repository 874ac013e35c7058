//! GET /v1/items: order, limits, tag filter and keyset pagination.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_problem, database_of, spawn_app, spawn_app_with, test_settings};

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

/// Every page of `query` (without `limit`), following `next_cursor`: (created_at, id) in the
/// order served.
async fn every_page(app: &TestApp, query: &str, limit: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let separator = if query.is_empty() { "?" } else { "&" };
        let mut url = format!("{query}{separator}limit={limit}");
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let current = page(app, &url).await;
        seen.extend(
            current["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| (i["created_at"].as_str().unwrap().to_owned(), i["id"].as_str().unwrap().to_owned())),
        );
        match current["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return seen,
        }
    }
    panic!("more than 100 pages of {query}");
}

/// `seen` holds `count` items, none twice, newest first and then by id descending (the
/// same instant is the same string, so the pairs sort as the list does).
fn assert_each_once_newest_first(seen: &[(String, String)], count: usize) {
    assert_eq!(seen.len(), count, "every item exactly once: {seen:?}");
    assert_eq!(seen.iter().map(|(_, id)| id).collect::<HashSet<_>>().len(), count, "no repeats");
    let mut expected = seen.to_vec();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, expected, "newest first, then id descending");
}

#[tokio::test]
async fn a_tag_pages_through_its_items_only_newest_first_with_ties() {
    let app = spawn_app().await;
    // Written by SQL, not the API: the tag index follows every writer. 13 tagged items share
    // one created_at, 4 more are around them, and 30 others carry other tags or none.
    app.db()
        .await
        .batch_execute(
            "INSERT INTO items (id, name, tags, created_at, updated_at) \
             SELECT gen_random_uuid(), 'tied ' || n, ARRAY['wanted', 'x'], '2026-01-01T00:00:00Z', now() FROM generate_series(1, 13) n; \
             INSERT INTO items (id, name, tags, created_at, updated_at) \
             SELECT gen_random_uuid(), 'spread ' || n, ARRAY['wanted', 'wanted'], '2026-01-01T00:00:00Z'::timestamptz + n * interval '1 second' - interval '2 seconds', now() \
             FROM generate_series(1, 4) n; \
             INSERT INTO items (id, name, tags, created_at, updated_at) \
             SELECT gen_random_uuid(), 'other ' || n, CASE WHEN n % 2 = 0 THEN ARRAY['x'] ELSE '{}' END, \
               '2026-01-01T00:00:00Z'::timestamptz + (n - 15) * interval '1 second', now() FROM generate_series(1, 30) n;",
        )
        .await
        .unwrap();
    assert_each_once_newest_first(&every_page(&app, "?tag=wanted", 3).await, 17);
    assert_eq!(every_page(&app, "?tag=x", 7).await.len(), 28);
    assert_eq!(every_page(&app, "", 50).await.len(), 47);
}

#[tokio::test]
async fn a_tag_list_follows_patches_and_deletes() {
    let app = spawn_app().await;
    let item: Value =
        app.post_json("/v1/items", &json!({"name": "moving", "tags": ["a", "b"]})).await.json().await.unwrap();
    let id = item["id"].as_str().unwrap().to_owned();
    let tagged = |tag: &'static str| {
        let app = &app;
        async move { ids(&page(app, &format!("?tag={tag}")).await) }
    };
    assert_eq!(tagged("a").await, std::slice::from_ref(&id));

    let path = format!("/v1/items/{id}");
    assert_eq!(app.patch_json(&path, &json!({"tags": ["b", "c"]}), None).await.status(), 200);
    assert!(tagged("a").await.is_empty(), "a tag removed by a patch");
    assert_eq!(tagged("b").await, std::slice::from_ref(&id));
    assert_eq!(tagged("c").await, std::slice::from_ref(&id));
    assert_eq!(app.patch_json(&path, &json!({"name": "renamed"}), None).await.status(), 200);
    assert_eq!(page(&app, "?tag=c").await["items"][0]["name"], "renamed");

    assert_eq!(app.client.delete(app.url(&path)).send().await.unwrap().status(), 204);
    assert!(tagged("b").await.is_empty());
    assert!(tagged("c").await.is_empty());
    let left: i64 = app.db().await.query_one("SELECT count(*) FROM item_tags", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "a deleted item leaves no tag rows");
}

#[tokio::test]
async fn items_written_before_the_tag_index_are_listed_by_tag() {
    let mut settings = test_settings();
    let _database = database_of(&settings);
    data_service::db::create_database_if_missing(&settings.database).await.unwrap();
    data_service::db::migrate_to(&settings.database, refinery::Target::Version(2)).await.unwrap();
    let url = secrecy::ExposeSecret::expose_secret(&settings.database.url).to_owned();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "INSERT INTO items (id, name, tags) \
             SELECT gen_random_uuid(), 'old ' || n, ARRAY['old', 'n' || n] FROM generate_series(1, 5) n",
        )
        .await
        .unwrap();
    drop(client);
    settings.database.migrate_on_start = true;
    let app = spawn_app_with(settings).await;
    assert_eq!(every_page(&app, "?tag=old", 2).await.len(), 5);
    assert_eq!(ids(&page(&app, "?tag=n3").await).len(), 1);
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
    assert_each_once_newest_first(&every_page(&app, "", 4).await, 22);
}
