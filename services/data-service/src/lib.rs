//! The Stackline data service: the items API on Postgres, with a Redis read cache.

pub mod cache;
pub mod configuration;
pub mod db;
pub mod error;
pub mod items;
pub mod openapi;
pub mod startup;

use observability::ServiceInfo;
use observability::telemetry;

pub const SERVICE_NAME: &str = "data-service";

/// `data-service` / `data-service serve`: runs the API until SIGTERM or SIGINT.
pub async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let loaded = configuration::load()?;
    let service =
        ServiceInfo { name: SERVICE_NAME, version: env!("CARGO_PKG_VERSION"), environment: loaded.environment };
    let _log_guard = telemetry::init_stdout(&service, &loaded.settings.log)?;
    tracing::info!(files = ?loaded.files, settings = ?loaded.settings, "configuration loaded");
    let application = startup::Application::build(loaded.settings, service).await?;
    application.run_until_stopped().await?;
    Ok(())
}

/// `data-service migrate`: applies pending migrations and exits.
pub async fn migrate() -> Result<(), Box<dyn std::error::Error>> {
    let loaded = configuration::load()?;
    let service =
        ServiceInfo { name: SERVICE_NAME, version: env!("CARGO_PKG_VERSION"), environment: loaded.environment };
    let _log_guard = telemetry::init_stdout(&service, &loaded.settings.log)?;
    if loaded.settings.database.create_database {
        db::create_database_if_missing(&loaded.settings.database).await?;
    }
    let applied = db::migrate(&loaded.settings.database).await?;
    tracing::info!(applied, "migrations up to date");
    Ok(())
}
