//! The Redis cache: filled on reads, updated by writes, never moving backwards, and optional.

use std::process::{Child, Command, Stdio};

use data_service::cache::{Cache, Lookup};
use serde_json::{Value, json};

use crate::helpers::{Deadline, TestApp, free_port, metric_sum, spawn_app, spawn_app_with, test_settings};

fn redis_get(port: u16, key: &str) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--no-raw", "GET", key])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn cache_key(app: &TestApp, id: &str) -> String {
    format!("{}item:{id}", app.cache.prefix)
}

async fn wait_for_cached_version(app: &TestApp, port: u16, id: &str, version: i32) {
    let deadline = Deadline::after_secs(10);
    let prefix = format!("\"{version}|");
    while !redis_get(port, &cache_key(app, id)).starts_with(&prefix) {
        deadline.check(&format!("version {version} in the cache"));
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn reads_fill_the_cache_and_writes_replace_it() {
    let app = spawn_app().await;
    let item = app.create("cached").await;
    let id = item["id"].as_str().unwrap();
    let path = format!("/v1/items/{id}");

    assert_eq!(app.get(&path).await.status(), 200);
    wait_for_cached_version(&app, 6379, id, 1).await;
    let hits = metric_sum(&app.metrics().await, "cache_hits_total", &[]);
    assert_eq!(app.get(&path).await.json::<Value>().await.unwrap(), item);
    assert!(metric_sum(&app.metrics().await, "cache_hits_total", &[]) > hits, "second read is a hit");

    let patched: Value = app.patch_json(&path, &json!({"name": "changed"}), None).await.json().await.unwrap();
    assert!(redis_get(6379, &cache_key(&app, id)).starts_with("\"2|"), "the write updated the cache before answering");
    assert_eq!(app.get(&path).await.json::<Value>().await.unwrap(), patched);

    assert_eq!(app.client.delete(app.url(&path)).send().await.unwrap().status(), 204);
    assert_eq!(redis_get(6379, &cache_key(&app, id)), "\"3|\"", "a tombstone above the last version");
    assert_eq!(app.get(&path).await.status(), 404);
}

#[tokio::test]
async fn a_late_fill_cannot_overwrite_a_newer_write_or_resurrect_a_deletion() {
    let mut settings = test_settings().cache;
    settings.key_prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    let cache = Cache::new(&settings).unwrap();
    let id = uuid::Uuid::new_v4();

    cache.record_write(id, 2, Some(b"{\"v\":2}".to_vec())).await;
    cache.fill(id, 1, b"{\"v\":1}".to_vec()).await; // a reader that fetched version 1 earlier
    assert!(matches!(cache.get(id).await, Lookup::Item { version: 2, .. }));

    cache.record_write(id, 2, None).await; // deleted at version 2
    cache.fill(id, 2, b"{\"v\":2}".to_vec()).await;
    assert!(matches!(cache.get(id).await, Lookup::Deleted));

    let _ = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "DEL", &format!("{}item:{id}", settings.key_prefix)])
        .output();
}

/// A redis-server of this test's own, so the test can stop it.
struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Deadline::after_secs(10);
        loop {
            let ping =
                Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string(), "PING"]).output().unwrap();
            if String::from_utf8_lossy(&ping.stdout).contains("PONG") {
                break;
            }
            deadline.check("redis-server to answer");
        }
        Self { port, child: Some(child) }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn the_service_works_without_redis_and_caching_resumes_when_it_returns() {
    let mut redis = OwnRedis::start(free_port());
    let mut settings = test_settings();
    settings.cache.url = secrecy::SecretString::from(format!("redis://127.0.0.1:{}/0", redis.port));
    settings.cache.retry_after_failure_ms = 200;
    let app = spawn_app_with(settings).await;
    let item = app.create("resilient").await;
    let id = item["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/items/{id}");
    app.get(&path).await;
    wait_for_cached_version(&app, redis.port, &id, 1).await;

    redis.stop();
    assert_eq!(app.get(&path).await.status(), 200, "reads fall back to Postgres");
    let patched = app.patch_json(&path, &json!({"name": "while redis was down"}), None).await;
    assert_eq!(patched.status(), 200, "writes succeed");
    assert_eq!(app.get(&path).await.json::<Value>().await.unwrap()["version"], 2);
    assert_eq!(app.post_json("/v1/items", &json!({"name": "new"})).await.status(), 201);
    let metrics = app.metrics().await;
    assert!(metric_sum(&metrics, "cache_errors_total", &[]) >= 1.0, "failures are counted");
    assert_eq!(metric_sum(&metrics, "cache_pending_updates", &[]), 1.0, "the PATCH's cache update waits");
    let ready: Value = app.get("/ready").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready", "Redis is not critical");
    assert_eq!(ready["checks"]["redis"]["status"], "fail");

    // Same port, empty cache: the pending update lands and reads are cached again.
    let redis = OwnRedis::start(redis.port);
    wait_for_cached_version(&app, redis.port, &id, 2).await;
    let deadline = Deadline::after_secs(10);
    let hits_before = metric_sum(&app.metrics().await, "cache_hits_total", &[]);
    loop {
        assert_eq!(app.get(&path).await.json::<Value>().await.unwrap()["name"], "while redis was down");
        if metric_sum(&app.metrics().await, "cache_hits_total", &[]) > hits_before {
            break;
        }
        deadline.check("cache hits after Redis came back");
    }
    assert_eq!(metric_sum(&app.metrics().await, "cache_pending_updates", &[]), 0.0);
}
