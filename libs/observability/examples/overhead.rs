//! The cost of the middleware, measured by `scripts/bench-observability`: one trivial handler
//! served twice, bare and wrapped in [`Observe`] (request id, root span, metrics, one JSON
//! access-log line per request), with the same worker count.
//!
//! ```sh
//! cargo run --release -p observability --example overhead -- 127.0.0.1:18101 127.0.0.1:18102 2 > /tmp/overhead.log
//! ```

use std::process::ExitCode;

use actix_web::{App, HttpServer, web};
use observability::metrics::{Metrics, configure_metrics};
use observability::telemetry::{self, LogSettings};
use observability::{Observe, ServiceInfo};

async fn hello() -> &'static str {
    "hello"
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bare, observed, workers] = args.as_slice() else {
        eprintln!("usage: overhead BARE_ADDR OBSERVED_ADDR WORKERS");
        return ExitCode::from(2);
    };
    let Ok(workers) = workers.parse::<usize>() else {
        eprintln!("overhead: WORKERS must be a number");
        return ExitCode::from(2);
    };
    match run(bare, observed, workers) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("overhead: {error}");
            ExitCode::FAILURE
        }
    }
}

#[actix_web::main]
async fn run(bare: &str, observed: &str, workers: usize) -> Result<(), Box<dyn std::error::Error>> {
    let service = ServiceInfo { name: "overhead", version: env!("CARGO_PKG_VERSION"), environment: "bench".to_owned() };
    let _log_guard = telemetry::init_stdout(&service, &LogSettings { level: "info".to_owned() })?;
    let metrics = Metrics::install(&service)?;

    let bare = HttpServer::new(|| App::new().route("/hello", web::get().to(hello))).workers(workers).bind(bare)?.run();
    let observed = HttpServer::new(move || {
        App::new().wrap(Observe).configure(configure_metrics(metrics.clone())).route("/hello", web::get().to(hello))
    })
    .workers(workers)
    .bind(observed)?
    .run();
    let (bare, observed) = tokio::join!(bare, observed);
    bare?;
    observed?;
    Ok(())
}
