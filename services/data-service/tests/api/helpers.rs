//! `spawn_app()`: the real service on a free port, against its own fresh database on the
//! machine's Postgres and its own key prefix in Redis; both removed when the app is dropped.

use std::net::SocketAddr;
use std::sync::LazyLock;

use data_service::configuration::{self, Settings};
use data_service::startup::Application;
use observability::ServiceInfo;
use observability::telemetry::{self, CapturedLogs};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const REDIS: &str = "redis://127.0.0.1:6379/0";

pub static LOGS: LazyLock<CapturedLogs> = LazyLock::new(|| {
    let logs = CapturedLogs::default();
    let service = service();
    telemetry::init(&service, &observability::telemetry::LogSettings { level: "info".to_owned() }, logs.clone())
        .expect("logging");
    logs
});

fn service() -> ServiceInfo {
    ServiceInfo { name: "data-service", version: "test", environment: "test".to_owned() }
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub database: String,
    pub key_prefix: String,
}

/// Settings for a test: a fresh database name, a fresh cache prefix, port 0.
pub fn test_settings() -> Settings {
    let mut settings = configuration::load().expect("settings").settings;
    let unique = uuid::Uuid::new_v4().simple().to_string();
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.shutdown.drain_delay_secs = 0;
    settings.database.url = SecretString::from(format!("{POSTGRES}/test_{unique}"));
    settings.database.create_database = true;
    settings.database.migrate_on_start = true;
    settings.cache.url = SecretString::from(REDIS);
    settings.cache.key_prefix = format!("test:{unique}:");
    settings
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_settings()).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    LazyLock::force(&LOGS);
    let database =
        secrecy::ExposeSecret::expose_secret(&settings.database.url).rsplit('/').next().unwrap_or_default().to_owned();
    let key_prefix = settings.cache.key_prefix.clone();
    let application = Application::build(settings, service()).await.expect("application builds");
    let address = format!("http://127.0.0.1:{}", application.port());
    tokio::spawn(application.run_until_stopped());
    TestApp { address, client: reqwest::Client::new(), database, key_prefix }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // Leave nothing behind: the database (open connections included) and cache keys.
        test_support::drop_database(&self.database);
        test_support::delete_redis_keys(&self.key_prefix);
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    pub async fn patch_json(&self, path: &str, body: &Value, if_match: Option<&str>) -> reqwest::Response {
        let mut request = self.client.patch(self.url(path)).json(body);
        if let Some(tag) = if_match {
            request = request.header("If-Match", tag);
        }
        request.send().await.expect("request")
    }

    /// Creates an item and returns its JSON.
    pub async fn create(&self, name: &str) -> Value {
        let response = self.post_json("/v1/items", &json!({ "name": name })).await;
        assert_eq!(response.status(), 201);
        response.json().await.expect("item")
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.expect("metrics")
    }

    /// A direct connection to this app's database.
    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&format!("{POSTGRES}/{}", self.database), tokio_postgres::NoTls)
                .await
                .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}

/// Asserts a problem+json response and returns its document.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], "about:blank");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(body["request_id"], request_id.as_str(), "request id in the body matches the header");
    body
}

/// Sum of every sample of `name` whose labels include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            (series_name == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// A TCP forwarder to `upstream` that a test can cut: while down it closes every existing
/// connection and refuses new ones at once, the way a crashed or partitioned server looks.
pub struct TcpProxy {
    pub address: SocketAddr,
    up: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (up, _) = watch::channel(true);
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = state.subscribe();
                if !*cut.borrow() {
                    continue; // dropped: the client sees the connection closed
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { address, up }
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// Flag for tests that must not outlive a deadline.
pub struct Deadline(std::time::Instant);

impl Deadline {
    pub fn after_secs(secs: u64) -> Self {
        Self(std::time::Instant::now() + std::time::Duration::from_secs(secs))
    }

    pub fn check(&self, what: &str) {
        assert!(std::time::Instant::now() < self.0, "timed out waiting for {what}");
    }
}
