//! The service's settings: `config/base.yaml` compiled in, then `config/$APP_ENV.yaml`, then
//! `APP__SECTION__KEY` variables (see `observability::settings`).

use observability::health::HealthSettings;
use observability::server::ServerSettings;
use observability::settings::{self, Loaded, SettingsError};
use observability::shutdown::ShutdownSettings;
use observability::telemetry::LogSettings;
use secrecy::SecretString;
use serde::Deserialize;

const BASE: &str = include_str!("../config/base.yaml");

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub health: HealthSettings,
    pub database: DatabaseSettings,
    pub cache: CacheSettings,
    pub items: ItemsSettings,
    pub idempotency: IdempotencySettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: SecretString,
    /// A file holding the password (a mounted secret); empty: the password, if any, is in `url`.
    pub password_file: String,
    pub create_database: bool,
    pub migrate_on_start: bool,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    pub wait_timeout_ms: u64,
    pub recycle_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    pub url: SecretString,
    pub key_prefix: String,
    pub ttl_secs: u64,
    pub pool_size: usize,
    pub timeout_ms: u64,
    pub retry_after_failure_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemsSettings {
    pub body_limit_bytes: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySettings {
    pub ttl_secs: u64,
    pub purge_interval_secs: u64,
}

pub fn load() -> Result<Loaded<Settings>, SettingsError> {
    settings::load(BASE)
}
