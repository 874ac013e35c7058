//! The gateway's settings (see `observability::settings` for the layering).

use std::collections::BTreeMap;

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
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub health: HealthSettings,
    pub proxy: ProxySettings,
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    pub routes: Vec<RouteSettings>,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    pub body_limit_bytes: u64,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_retries: u32,
    pub retry_budget_ratio: f64,
    pub eject_secs: u64,
    pub breaker_failures: u32,
    pub breaker_open_secs: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    pub urls: Vec<String>,
}

/// Requests whose path starts with `prefix` go to `upstream`, with `prefix` replaced by
/// `upstream_prefix`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub prefix: String,
    pub upstream: String,
    pub upstream_prefix: String,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// JSON list of keys; ignored when `keys_file` is set.
    pub keys: SecretString,
    pub keys_file: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub redis_url: SecretString,
    pub key_prefix: String,
    pub timeout_ms: u64,
    pub retry_after_failure_ms: u64,
    pub fail_open: bool,
}

pub fn load() -> Result<Loaded<Settings>, SettingsError> {
    settings::load(BASE)
}
