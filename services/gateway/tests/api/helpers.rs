//! Gateways on free ports in front of either a real data service (its own fresh database)
//! or test upstreams whose behaviour a test controls.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use async_trait::async_trait;
use futures_util::StreamExt;
use gateway::configuration::{self, Settings};
use gateway::startup::Application;
use gateway::upstream::discovery::Resolve;
use observability::ServiceInfo;
use observability::telemetry::{self, CapturedLogs, LogSettings};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
pub use test_support::{Deadline, assert_problem, free_port, metric_sum, unique};
use test_support::{RedisNamespace, TestDatabase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub static LOGS: LazyLock<CapturedLogs> = LazyLock::new(|| {
    let logs = CapturedLogs::default();
    let service = ServiceInfo { name: "gateway", version: "test", environment: "test".to_owned() };
    telemetry::init(&service, &LogSettings { level: "info".to_owned() }, logs.clone()).expect("logging");
    logs
});

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
    /// The upstream's name, this test's own, so its metric series are too.
    pub upstream: String,
    _rate_limits: RedisNamespace,
}

impl TestGateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(&self.key.secret)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&self.key.secret)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }

    /// The sum of `name` over this gateway's upstream's series with `labels`.
    pub async fn upstream_metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels = labels.to_vec();
        labels.push(("upstream", &self.upstream));
        metric_sum(&self.metrics().await, name, &labels)
    }

    /// Waits until `condition` holds for this gateway's metrics (bounded).
    pub async fn wait_for_metrics(&self, what: &str, condition: impl Fn(&str) -> bool) {
        let deadline = Deadline::after_secs(10);
        loop {
            if condition(&self.metrics().await) {
                return;
            }
            deadline.check(what);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Gateway settings with `upstreams` as the one upstream's URLs (under a name of this
/// test's own), `key` at `rate_per_sec`/`burst`, rate limits under a fresh prefix, and the
/// test-friendly timings: no drain, frequent health checks.
pub fn gateway_settings_for(upstreams: &[&str], key: &Key, rate_per_sec: u32, burst: u32) -> Settings {
    let mut settings = configuration::load().expect("settings").settings;
    settings.server.port = 0;
    settings.server.workers = 1;
    settings.admin.port = 0;
    settings.shutdown.drain_delay_secs = 0;
    settings.proxy.health_check.interval_ms = 100;
    let name = format!("upstream-{}", &unique()[..8]);
    settings.upstreams.clear();
    settings.upstreams.insert(
        name.clone(),
        configuration::UpstreamSettings { urls: upstreams.iter().map(|u| (*u).to_owned()).collect() },
    );
    settings.routes[0].upstream = name;
    settings.auth.keys = SecretString::from(key.config(rate_per_sec, burst));
    settings.rate_limit.key_prefix = format!("test:rl:{}:", unique());
    settings
}

pub fn gateway_settings(upstream: &str, key: &Key, rate_per_sec: u32, burst: u32) -> Settings {
    gateway_settings_for(&[upstream], key, rate_per_sec, burst)
}

pub async fn spawn_gateway(settings: Settings, key: Key) -> TestGateway {
    spawn_gateway_with_resolver(settings, key, None).await
}

pub async fn spawn_gateway_with_resolver(
    settings: Settings,
    key: Key,
    resolver: Option<Arc<dyn Resolve>>,
) -> TestGateway {
    LazyLock::force(&LOGS);
    let service = ServiceInfo { name: "gateway", version: "test", environment: "test".to_owned() };
    let upstream = settings.routes[0].upstream.clone();
    let rate_limits = RedisNamespace { prefix: settings.rate_limit.key_prefix.clone() };
    let application = match resolver {
        Some(resolver) => Application::build_with_resolver(settings, service, resolver).await,
        None => Application::build(settings, service).await,
    }
    .expect("gateway builds");
    let address = format!("http://127.0.0.1:{}", application.port());
    let admin = format!("http://127.0.0.1:{}", application.admin_port());
    tokio::spawn(application.run_until_stopped());
    TestGateway { address, admin, client: reqwest::Client::new(), key, upstream, _rate_limits: rate_limits }
}

/// A resolver whose answer the test sets, as a DNS server's answer changes.
#[derive(Clone, Default)]
pub struct TestResolver(Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>);

impl TestResolver {
    pub fn answer(&self, host: &str, addresses: &[&str]) {
        let addresses = addresses.iter().map(|a| a.trim_start_matches("http://").parse().unwrap()).collect();
        self.0.lock().unwrap().insert(host.to_owned(), addresses);
    }
}

#[async_trait]
impl Resolve for TestResolver {
    async fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        self.0
            .lock()
            .unwrap()
            .get(host)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: no such name")))
    }
}

/// A real data service on its own fresh database; dropped with it.
pub struct DataService {
    pub address: String,
    _database: TestDatabase,
    _cache: RedisNamespace,
}

impl DataService {
    pub async fn start() -> Self {
        LazyLock::force(&LOGS);
        let database = TestDatabase::new("test_gw");
        let cache = RedisNamespace::new("gw");
        let mut settings = data_service::configuration::load().expect("settings").settings;
        settings.server.port = 0;
        settings.server.workers = 1;
        settings.shutdown.drain_delay_secs = 0;
        settings.database.url = SecretString::from(database.url());
        settings.cache.key_prefix = cache.prefix.clone();
        let service = ServiceInfo { name: "data-service", version: "test", environment: "test".to_owned() };
        let application = data_service::startup::Application::build(settings, service).await.expect("data service");
        let address = format!("http://127.0.0.1:{}", application.port());
        tokio::spawn(application.run_until_stopped());
        Self { address, _database: database, _cache: cache }
    }
}

/// The `Date` the test upstream's echo answers with: far from any gateway's clock.
pub const UPSTREAM_DATE: &str = "Mon, 01 Jan 2001 00:00:00 GMT";

/// An upstream a test controls: `/v1/items/echo` describes the request it received,
/// `/v1/items/big?bytes=` answers a large body, `/v1/items/slow?ms=` answers late,
/// `/v1/items/flaky` fails while `failing` is set, `/v1/items/busy` is always 503, and
/// `/ready` answers 503 while `ready` is unset.
pub struct TestUpstream {
    pub address: String,
    pub failing: Arc<AtomicBool>,
    pub ready: Arc<AtomicBool>,
    /// Requests to `/v1/items/...`.
    pub hits: Arc<AtomicU64>,
}

#[derive(Clone)]
struct UpstreamState {
    failing: Arc<AtomicBool>,
    ready: Arc<AtomicBool>,
    hits: Arc<AtomicU64>,
}

impl TestUpstream {
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// On `port` (0: any free port).
    pub fn start_on(port: u16) -> Self {
        let state = UpstreamState {
            failing: Arc::new(AtomicBool::new(false)),
            ready: Arc::new(AtomicBool::new(true)),
            hits: Arc::new(AtomicU64::new(0)),
        };
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let shared = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(shared.clone()))
                .route("/v1/items/echo", web::to(echo))
                .route("/v1/items/slow", web::get().to(slow))
                .route("/v1/items/flaky", web::get().to(flaky))
                .route("/v1/items/busy", web::to(busy))
                .route("/v1/items/big", web::get().to(big))
                .route("/ready", web::get().to(ready))
        })
        .workers(1)
        .listen(listener)
        .unwrap()
        .run();
        tokio::spawn(server);
        Self { address, failing: state.failing, ready: state.ready, hits: state.hits }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

type Shared = web::Data<UpstreamState>;

async fn echo(req: HttpRequest, mut body: web::Payload, shared: Shared) -> HttpResponse {
    shared.hits.fetch_add(1, Ordering::SeqCst);
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
            "local": req.app_config().local_addr().to_string(),
        }))
}

async fn slow(query: web::Query<HashMap<String, u64>>, shared: Shared) -> HttpResponse {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(query.get("ms").copied().unwrap_or(0))).await;
    HttpResponse::Ok().finish()
}

async fn flaky(shared: Shared) -> HttpResponse {
    shared.hits.fetch_add(1, Ordering::SeqCst);
    if shared.failing.load(Ordering::SeqCst) {
        HttpResponse::InternalServerError().finish()
    } else {
        HttpResponse::Ok().finish()
    }
}

/// `bytes` bytes of `z`, with a length or (`chunked=1`) in chunks of unknown total.
async fn big(query: web::Query<HashMap<String, usize>>) -> HttpResponse {
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
    shared.hits.fetch_add(1, Ordering::SeqCst);
    HttpResponse::ServiceUnavailable().finish()
}

async fn ready(shared: Shared) -> HttpResponse {
    if shared.ready.load(Ordering::SeqCst) {
        HttpResponse::Ok().finish()
    } else {
        HttpResponse::ServiceUnavailable().finish()
    }
}

/// An upstream that reads each request whole and then closes the connection without a
/// word: a server that crashed mid-request. `/ready` is answered 200, so that health
/// checks keep it in rotation and only real requests find it failing.
pub struct HangingUpUpstream {
    pub address: String,
    /// Requests read (health checks excluded).
    pub received: Arc<AtomicU64>,
}

impl HangingUpUpstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Some(head) = read_request(&mut stream).await else { return };
                    if head.starts_with("GET /ready") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    // Dropped: the connection closes with no response.
                });
            }
        });
        Self { address, received }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

/// Reads one request (head, and a body of `content-length` bytes); returns the head.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    Some(head)
}
