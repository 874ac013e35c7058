//! An in-process app wired like a real service, on a free port, plus readers for what it
//! emits: captured JSON log lines and the Prometheus text.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, LazyLock};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpResponse, HttpServer, web};
use observability::health::{HealthSettings, configure_health};
use observability::metrics::{Metrics, configure_metrics};
use observability::request_id::propagation_headers;
use observability::server::{self, ServerSettings};
use observability::shutdown::ShutdownSettings;
use observability::telemetry::{self, CapturedLogs, LogSettings};
use observability::{CloseWhileDraining, HealthCheck, HealthRegistry, Observe, RequestId, ServiceInfo};
pub use test_support::metric_value;

pub fn service() -> ServiceInfo {
    ServiceInfo { name: "observability-test", version: "9.9.9", environment: "test".to_owned() }
}

/// Every test in this process logs here (one global subscriber per process).
pub static LOGS: LazyLock<CapturedLogs> = LazyLock::new(|| {
    let logs = CapturedLogs::default();
    telemetry::init(&service(), &LogSettings { level: "info".to_owned() }, logs.clone()).expect("logging");
    logs
});

fn server_settings() -> ServerSettings {
    ServerSettings { host: "127.0.0.1".to_owned(), port: 0, workers: 1 }
}

pub struct TestApp {
    pub address: String,
    /// The prefix of the app's own routes (`/items/{id}`, `/broken`, `/echo-context`, `/wait`).
    pub scope: String,
    pub client: reqwest::Client,
    pub health: HealthRegistry,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with_checks(Vec::new()).await
}

pub async fn spawn_app_with_checks(checks: Vec<Arc<dyn HealthCheck>>) -> TestApp {
    LazyLock::force(&LOGS);
    let metrics = Metrics::install(&service()).expect("metrics recorder");
    let health = HealthRegistry::new(&HealthSettings { check_timeout_ms: 300 }, checks);
    // The app's routes sit under a prefix of their own, so that their metric series (labelled
    // by route template) are this app's alone: the recorder is the process's, and under
    // `cargo test` every test runs in one process.
    let routes = format!("/t{}", &test_support::unique()[..8]);
    let scope = routes.clone();
    let listener = TcpListener::bind(server_settings().address()).expect("bind port 0");
    let address = format!("http://{}", listener.local_addr().expect("local address"));
    let server = HttpServer::new({
        let health = health.clone();
        move || {
            App::new()
                .wrap(from_fn(fail_when_asked))
                .wrap(CloseWhileDraining(health.clone()))
                .wrap(Observe)
                .configure(configure_health(service(), health.clone()))
                .configure(configure_metrics(metrics.clone()))
                .service(
                    web::scope(&routes)
                        .route("/items/{id}", web::get().to(item))
                        .route("/broken", web::get().to(broken))
                        .route("/echo-context", web::get().to(echo_context))
                        .route("/wait", web::get().to(wait_forever)),
                )
        }
    });
    let server =
        server::configure(server, &server_settings(), &ShutdownSettings { drain_delay_secs: 0, grace_period_secs: 1 })
            .listen(listener)
            .expect("listen")
            .run();
    tokio::spawn(server);
    TestApp { address, client: reqwest::Client::new(), health, scope }
}

impl TestApp {
    /// `path` of one of the app's own routes, with its prefix.
    pub fn route(&self, path: &str) -> String {
        format!("{}{path}", self.scope)
    }

    /// The full URL of an app route.
    pub fn route_url(&self, path: &str) -> String {
        format!("{}{}{path}", self.address, self.scope)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.address)).send().await.expect("request")
    }

    pub async fn metrics_text(&self) -> String {
        self.get("/metrics").await.text().await.expect("metrics body")
    }

    /// The value of one series, `None` when it does not exist.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics_text().await, name, labels)
    }
}

/// Log lines written while serving the request with this id.
pub fn log_lines_for(request_id: &str) -> Vec<serde_json::Value> {
    LOGS.lines().into_iter().filter(|line| line["request_id"] == request_id).collect()
}

async fn item(path: web::Path<String>) -> HttpResponse {
    tracing::warn!(item = %path, "looked up an item");
    HttpResponse::Ok().body(path.into_inner())
}

/// A handler failing with an internal cause that must reach the log, not the client.
async fn broken() -> Result<HttpResponse, actix_web::Error> {
    Err(actix_web::error::ErrorInternalServerError("database password is wrong"))
}

async fn echo_context(request_id: RequestId, req: actix_web::HttpRequest) -> HttpResponse {
    let headers = propagation_headers(&req);
    let propagated: HashMap<_, _> = headers.iter().collect();
    HttpResponse::Ok().json(serde_json::json!({ "extracted": request_id.as_str(), "propagated": propagated }))
}

/// Never answers: for disconnect tests.
async fn wait_forever() -> HttpResponse {
    std::future::pending::<()>().await;
    HttpResponse::Ok().finish()
}

/// A middleware that fails (returns `Err`, not a response) when asked to, inside `Observe`.
async fn fail_when_asked(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.headers().contains_key("x-fail-in-middleware") {
        return Err(actix_web::error::ErrorForbidden("refused by an inner middleware"));
    }
    next.call(req).await
}
