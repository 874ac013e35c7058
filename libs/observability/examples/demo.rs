//! The whole library wired into an actix app, as each Stackline service does it.
//!
//! ```sh
//! cargo run -p observability --example demo
//! curl -i localhost:8090/hello; curl localhost:8090/ready; curl localhost:8090/metrics
//! ```

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use async_trait::async_trait;
use observability::health::{HealthSettings, configure_health};
use observability::metrics::{Metrics, configure_metrics};
use observability::server::{self, ServerSettings};
use observability::settings;
use observability::shutdown::{ShutdownSettings, serve_until_stopped};
use observability::telemetry::{self, LogSettings};
use observability::{BackgroundTasks, CloseWhileDraining};
use observability::{HealthCheck, HealthRegistry, Observe, RequestId, ServiceInfo};
use serde::Deserialize;

#[derive(Deserialize)]
struct Settings {
    server: ServerSettings,
    log: LogSettings,
    shutdown: ShutdownSettings,
    health: HealthSettings,
    /// A TCP address that must accept connections for the demo to be ready.
    dependency: String,
}

const BASE_CONFIG: &str = "
server: { host: 127.0.0.1, port: 8090, workers: 0 }
log: { level: info }
shutdown: { drain_delay_secs: 5, grace_period_secs: 25 }
health: { check_timeout_ms: 1000 }
dependency: 127.0.0.1:5432
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo: {error}");
            ExitCode::FAILURE
        }
    }
}

#[actix_web::main]
async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let loaded = settings::load::<Settings>(BASE_CONFIG)?;
    let settings = loaded.settings;
    let service = ServiceInfo { name: "demo", version: env!("CARGO_PKG_VERSION"), environment: loaded.environment };
    let _log_guard = telemetry::init_stdout(&service, &settings.log)?;
    let metrics = Metrics::install(&service)?;
    let health = HealthRegistry::new(&settings.health, vec![Arc::new(TcpReachable(settings.dependency))]);

    let listener = TcpListener::bind(settings.server.address())?;
    tracing::info!(address = %listener.local_addr()?, "listening");
    let server = HttpServer::new({
        let health = health.clone();
        move || {
            App::new()
                .wrap(CloseWhileDraining(health.clone()))
                .wrap(Observe)
                .configure(configure_health(service.clone(), health.clone()))
                .configure(configure_metrics(metrics.clone()))
                .route("/hello", web::get().to(hello))
                .route("/work", web::get().to(work))
        }
    });
    let server = server::configure(server, &settings.server, &settings.shutdown).listen(listener)?.run();
    // Work beside the server (a real service refreshes, retries, purges), stopped after the drain.
    let mut background = BackgroundTasks::new();
    background.every_and_at_stop("flush", || Duration::from_secs(3600), || async { tracing::info!("flushed") });
    serve_until_stopped(server, health, background, &settings.shutdown).await?;
    Ok(())
}

async fn hello(request_id: RequestId) -> HttpResponse {
    tracing::info!("saying hello");
    HttpResponse::Ok().body(format!("hello, request {request_id}\n"))
}

#[derive(Deserialize)]
struct WorkQuery {
    ms: u64,
}

/// Stands in for a slow handler: `GET /work?ms=1500` answers after 1.5 s.
async fn work(query: web::Query<WorkQuery>) -> HttpResponse {
    tracing::info!(ms = query.ms, "work started");
    tokio::time::sleep(Duration::from_millis(query.ms)).await;
    HttpResponse::Ok().body("done\n")
}

struct TcpReachable(String);

#[async_trait]
impl HealthCheck for TcpReachable {
    fn name(&self) -> &'static str {
        "dependency"
    }

    fn critical(&self) -> bool {
        true
    }

    async fn check(&self) -> Result<(), String> {
        tokio::net::TcpStream::connect(&self.0).await.map(drop).map_err(|e| e.to_string())
    }
}
