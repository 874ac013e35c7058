//! The Stackline gateway: the only public entry to the items API.

pub mod auth;
pub mod configuration;
pub mod proxy;
pub mod ratelimit;
pub mod startup;
pub mod upstream;

use observability::ServiceInfo;
use observability::telemetry;

pub const SERVICE_NAME: &str = "gateway";

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let loaded = configuration::load()?;
    let service =
        ServiceInfo { name: SERVICE_NAME, version: env!("CARGO_PKG_VERSION"), environment: loaded.environment };
    let _log_guard = telemetry::init_stdout(&service, &loaded.settings.log)?;
    tracing::info!(files = ?loaded.files, settings = ?loaded.settings, "configuration loaded");
    let application = startup::Application::build(loaded.settings, service)?;
    application.run_until_stopped().await?;
    Ok(())
}
