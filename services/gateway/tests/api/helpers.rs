//! Gateways on free ports in front of either a real data service (its own fresh database)
//! or a test upstream whose behaviour a test controls.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use futures_util::StreamExt;
use gateway::configuration::{self, Settings};
use gateway::startup::Application;
use observability::ServiceInfo;
use observability::telemetry::{self, CapturedLogs, LogSettings};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub static LOGS: LazyLock<CapturedLogs> = LazyLock::new(|| {
    let logs = CapturedLogs::default();
    let service = ServiceInfo { name: "gateway", version: "test", environment: "test".to_owned() };
    telemetry::init(&service, &LogSettings { level: "info".to_owned() }, logs.clone()).expect("logging");
    logs
});

pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A client key and how it is configured.
#[derive(Clone)]
pub struct Key {
    pub secret: String,
    pub id: String,
}

impl Key {
    pub fn new() -> Self {
        Self { secret: format!("key-{}", unique()), id: format!("client-{}", &unique()[..8]) }
    }

    pub fn config(&self, rate_per_sec: u32, burst: u32) -> String {
        let hash = format!("{:x}", Sha256::digest(self.secret.as_bytes()));
        format!(r#"[{{"id":"{}","sha256":"{hash}","rate_per_sec":{rate_per_sec},"burst":{burst}}}]"#, self.id)
    }
}

pub struct TestGateway {
    pub address: String,
    pub admin: String,
    pub client: reqwest::Client,
    pub key: Key,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(&self.key.secret)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }
}

/// Gateway settings for `upstream`; `key` gets `rate_per_sec`/`burst`; the rate-limit
/// prefix is the caller's, so two gateways can share (or not share) buckets.
pub fn gateway_settings(upstream: &str, key: &Key, rate_per_sec: u32, burst: u32, limit_prefix: &str) -> Settings {
    let mut settings = configuration::load().expect("settings").settings;
    settings.server.port = 0;
    settings.server.workers = 1;
    settings.admin.port = 0;
    settings.shutdown.drain_delay_secs = 0;
    settings.upstreams.get_mut("data-service").expect("default upstream").urls = vec![upstream.to_owned()];
    settings.auth.keys = SecretString::from(key.config(rate_per_sec, burst));
    settings.rate_limit.key_prefix = limit_prefix.to_owned();
    settings
}

pub async fn spawn_gateway(settings: Settings, key: Key) -> TestGateway {
    LazyLock::force(&LOGS);
    let service = ServiceInfo { name: "gateway", version: "test", environment: "test".to_owned() };
    let application = Application::build(settings, service).expect("gateway builds");
    let address = format!("http://127.0.0.1:{}", application.port());
    let admin = format!("http://127.0.0.1:{}", application.admin_port());
    tokio::spawn(application.run_until_stopped());
    TestGateway { address, admin, client: reqwest::Client::new(), key }
}

/// A real data service on its own fresh database; dropped with it.
pub struct DataService {
    pub address: String,
    database: String,
}

impl DataService {
    pub async fn start() -> Self {
        LazyLock::force(&LOGS);
        let mut settings = data_service::configuration::load().expect("settings").settings;
        let name = format!("test_gw_{}", unique());
        settings.server.port = 0;
        settings.server.workers = 1;
        settings.shutdown.drain_delay_secs = 0;
        settings.database.url = SecretString::from(format!("postgres://postgres@127.0.0.1:5432/{name}"));
        settings.cache.key_prefix = format!("{name}:");
        assert!(settings.database.url.expose_secret().ends_with(&name));
        let service = ServiceInfo { name: "data-service", version: "test", environment: "test".to_owned() };
        let application = data_service::startup::Application::build(settings, service).await.expect("data service");
        let address = format!("http://127.0.0.1:{}", application.port());
        tokio::spawn(application.run_until_stopped());
        Self { address, database: name }
    }
}

impl Drop for DataService {
    fn drop(&mut self) {
        test_support::drop_database(&self.database);
        test_support::delete_redis_keys(&format!("{}:", self.database));
    }
}

/// The `Date` the test upstream's echo answers with: far from any gateway's clock.
pub const UPSTREAM_DATE: &str = "Mon, 01 Jan 2001 00:00:00 GMT";

/// An upstream a test controls: `/v1/items/echo` describes the request it received,
/// `/v1/items/big?bytes=` answers a large body, `/v1/items/slow?ms=` answers late, `/v1/items/flaky` fails while `failing` is set.
pub struct TestUpstream {
    pub address: String,
    pub failing: Arc<AtomicBool>,
    pub hits: Arc<AtomicU64>,
}

impl TestUpstream {
    pub fn start() -> Self {
        let failing = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let (f, h) = (failing.clone(), hits.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new((f.clone(), h.clone())))
                .route("/v1/items/echo", web::to(echo))
                .route("/v1/items/slow", web::get().to(slow))
                .route("/v1/items/flaky", web::get().to(flaky))
                .route("/v1/items/busy", web::to(busy))
                .route("/v1/items/big", web::get().to(big))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        Self { address, failing, hits }
    }
}

type Shared = web::Data<(Arc<AtomicBool>, Arc<AtomicU64>)>;

async fn echo(req: HttpRequest, mut body: web::Payload, shared: Shared) -> HttpResponse {
    shared.1.fetch_add(1, Ordering::SeqCst);
    let mut size = 0usize;
    while let Some(chunk) = body.next().await {
        size += chunk.map(|c| c.len()).unwrap_or(0);
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), serde_json::Value::from(v.to_str().unwrap_or("?"))))
        .collect();
    HttpResponse::Ok()
        .insert_header(("location", "/v1/items/elsewhere"))
        .insert_header(("proxy-authenticate", "Basic realm=upstream"))
        .insert_header(("date", UPSTREAM_DATE))
        .json(serde_json::json!({
            "method": req.method().as_str(),
            "query": req.query_string(),
            "body_bytes": size,
            "headers": headers,
            "peer": req.peer_addr().map(|a| a.to_string()),
        }))
}

async fn slow(query: web::Query<std::collections::HashMap<String, u64>>, shared: Shared) -> HttpResponse {
    shared.1.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(query.get("ms").copied().unwrap_or(0))).await;
    HttpResponse::Ok().finish()
}

async fn flaky(shared: Shared) -> HttpResponse {
    shared.1.fetch_add(1, Ordering::SeqCst);
    if shared.0.load(Ordering::SeqCst) {
        HttpResponse::InternalServerError().finish()
    } else {
        HttpResponse::Ok().finish()
    }
}

/// `bytes` bytes of `z`, with a length or (`chunked=1`) in chunks of unknown total.
async fn big(query: web::Query<std::collections::HashMap<String, usize>>) -> HttpResponse {
    let body = vec![b'z'; query.get("bytes").copied().unwrap_or(0)];
    if query.get("chunked") == Some(&1) {
        let chunks: Vec<_> =
            body.chunks(16 * 1024).map(|c| Ok::<_, std::io::Error>(web::Bytes::copy_from_slice(c))).collect();
        HttpResponse::Ok().streaming(futures_util::stream::iter(chunks))
    } else {
        HttpResponse::Ok().body(body)
    }
}

/// Always 503: "not now".
async fn busy(shared: Shared) -> HttpResponse {
    shared.1.fetch_add(1, Ordering::SeqCst);
    HttpResponse::ServiceUnavailable().finish()
}

pub async fn assert_problem(response: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert_eq!(body["request_id"], id.as_str());
    body
}
