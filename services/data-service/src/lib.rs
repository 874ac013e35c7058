//! The Stackline data service: the items API on Postgres, with a Redis read cache.

pub mod cache;
pub mod configuration;
pub mod db;
pub mod error;
pub mod items;
pub mod openapi;
pub mod startup;

use observability::Started;

pub const SERVICE_NAME: &str = "data-service";

fn start() -> Result<Started<configuration::Settings>, Box<dyn std::error::Error>> {
    observability::start(SERVICE_NAME, env!("CARGO_PKG_VERSION"), configuration::load, |settings| &settings.log)
}

/// `data-service` / `data-service serve`: runs the API until SIGTERM or SIGINT.
pub async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let Started { settings, service, log_guard: _log_guard } = start()?;
    let application = startup::Application::build(settings, service).await?;
    application.run_until_stopped().await?;
    Ok(())
}

/// `data-service migrate`: applies pending migrations and exits.
pub async fn migrate() -> Result<(), Box<dyn std::error::Error>> {
    let Started { settings, log_guard: _log_guard, .. } = start()?;
    if settings.database.create_database {
        db::create_database_if_missing(&settings.database).await?;
    }
    let applied = db::migrate(&settings.database).await?;
    tracing::info!(applied, "migrations up to date");
    Ok(())
}
