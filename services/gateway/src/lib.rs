//! The Stackline gateway: the only public entry to the items API.

pub mod auth;
pub mod client;
pub mod configuration;
pub mod proxy;
pub mod ratelimit;
pub mod startup;
pub mod upstream;

use observability::Started;

pub const SERVICE_NAME: &str = "gateway";

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let Started { settings, service, log_guard: _log_guard } =
        observability::start(SERVICE_NAME, env!("CARGO_PKG_VERSION"), configuration::load, |settings| &settings.log)?;
    let application = startup::Application::build(settings, service).await?;
    application.run_until_stopped().await?;
    Ok(())
}
