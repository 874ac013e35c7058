//! `spawn_app()`: the real service on a free port, against its own fresh database on the
//! machine's Postgres and its own key prefix in Redis; both removed when the app is dropped.

use std::sync::LazyLock;

use data_service::configuration::{self, Settings};
use data_service::startup::Application;
use observability::ServiceInfo;
use observability::telemetry::{self, CapturedLogs};
use secrecy::SecretString;
use serde_json::{Value, json};
pub use test_support::{Deadline, TcpProxy, assert_problem, free_port, metric_sum};
use test_support::{POSTGRES, REDIS, RedisNamespace, TestDatabase};

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
    pub database: TestDatabase,
    pub cache: RedisNamespace,
}

/// Settings for a test: a fresh database name, a fresh cache prefix, port 0.
pub fn test_settings() -> Settings {
    let mut settings = configuration::load().expect("settings").settings;
    settings.server.port = 0;
    settings.server.workers = 2;
    settings.shutdown.drain_delay_secs = 0;
    settings.database.url = SecretString::from(format!("{POSTGRES}/test_{}", test_support::unique()));
    settings.database.create_database = true;
    settings.database.migrate_on_start = true;
    settings.cache.url = SecretString::from(REDIS);
    settings.cache.key_prefix = format!("test:{}:", test_support::unique());
    settings
}

/// The database `settings` name, dropped (if it was created) when this is.
pub fn database_of(settings: &Settings) -> TestDatabase {
    let name = secrecy::ExposeSecret::expose_secret(&settings.database.url).rsplit('/').next().unwrap_or_default();
    TestDatabase { name: name.to_owned() }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(test_settings()).await
}

pub async fn spawn_app_with(settings: Settings) -> TestApp {
    LazyLock::force(&LOGS);
    // Whatever happens next, the database and the keys go when the app does.
    let database = database_of(&settings);
    let cache = RedisNamespace { prefix: settings.cache.key_prefix.clone() };
    let application = Application::build(settings, service()).await.expect("application builds");
    let address = format!("http://127.0.0.1:{}", application.port());
    tokio::spawn(application.run_until_stopped());
    TestApp { address, client: reqwest::Client::new(), database, cache }
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
        let (client, connection) = tokio_postgres::connect(&self.database.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}
