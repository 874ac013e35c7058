//! What every Stackline service needs to be operable, wired the same way in each:
//!
//! - [`telemetry`]: JSON (bunyan) logs on stdout, level from `RUST_LOG`, written in batches
//!   by [`batched_writer`]; [`access_log`] writes the per-request line.
//! - [`middleware::Observe`]: one actix middleware that assigns the request id, opens the
//!   request's root span, records the HTTP metrics and writes one access-log line.
//! - [`request_id`]: the [`RequestId`] extractor and the headers to propagate downstream.
//! - [`metrics`]: the Prometheus recorder, process metrics and the `/metrics` handler.
//! - [`health`]: the [`HealthCheck`] trait, the registry behind `/health` and `/ready`.
//! - [`healthcheck`]: the `healthcheck` subcommand container health checks run.
//! - [`shutdown`]: SIGTERM/SIGINT -> not ready, connections closed after each response ->
//!   drain delay -> graceful stop -> background tasks stopped.
//! - [`settings`]: layered configuration with one-line errors.
//! - [`server`]: the HTTP server tuning every service shares, and `GET`+`HEAD` routes.
//!
//! `examples/demo.rs` shows the whole wiring.

pub mod access_log;
pub mod batched_writer;
pub mod health;
pub mod healthcheck;
pub mod metrics;
pub mod middleware;
pub mod request_id;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use health::{HealthCheck, HealthRegistry};
pub use middleware::Observe;
pub use request_id::RequestId;
pub use shutdown::{BackgroundTasks, CloseWhileDraining};

/// Who is speaking: stamped on every log line and on `app_build_info`.
#[derive(Clone, Debug)]
pub struct ServiceInfo {
    pub name: &'static str,
    pub version: &'static str,
    /// The deployment environment (`APP_ENV`): `local`, `test`, `production`, ...
    pub environment: String,
}

/// What every service's `main` does first, the same way.
pub struct Started<S> {
    pub settings: S,
    pub service: ServiceInfo,
    /// Keep it until the process ends: dropping it flushes the logs.
    pub log_guard: telemetry::LogGuard,
}

/// Loads the settings with `load`, starts JSON logging at their level, and logs them (secrets
/// are `SecretString`s: redacted) with the files they came from.
pub fn start<S: std::fmt::Debug>(
    name: &'static str,
    version: &'static str,
    load: impl FnOnce() -> Result<settings::Loaded<S>, settings::SettingsError>,
    log_settings: impl FnOnce(&S) -> &telemetry::LogSettings,
) -> Result<Started<S>, Box<dyn std::error::Error>> {
    let loaded = load()?;
    let service = ServiceInfo { name, version, environment: loaded.environment };
    let log_guard = telemetry::init_stdout(&service, log_settings(&loaded.settings))?;
    tracing::info!(files = ?loaded.files, settings = ?loaded.settings, "configuration loaded");
    Ok(Started { settings: loaded.settings, service, log_guard })
}
