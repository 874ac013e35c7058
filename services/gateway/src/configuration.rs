//! The gateway's settings (see `observability::settings` for the layering), and what they
//! turn into once checked: the routes and their upstreams ([`Settings::routing`]).

use std::collections::BTreeMap;
use std::time::Duration;

use observability::health::HealthSettings;
use observability::server::ServerSettings;
use observability::settings::{self, Loaded, SettingsError};
use observability::shutdown::ShutdownSettings;
use observability::telemetry::LogSettings;
use secrecy::SecretString;
use serde::Deserialize;

use crate::upstream::discovery::{EndpointUrl, InvalidUrl};

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

/// How every upstream is reached. The policies are named as Envoy names them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    pub body_limit_bytes: u64,
    /// Request bodies up to this size are read whole before they are sent, so that a retry
    /// can send them again; larger ones stream (and are retried only when never sent).
    pub replay_buffer_bytes: u64,
    pub connect_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_retries: u32,
    /// How often host names in upstream URLs are resolved again.
    pub dns_refresh_ms: u64,
    /// Below this share of endpoints in rotation (percent), requests go to every endpoint.
    pub healthy_panic_threshold: u32,
    pub retry_budget: RetryBudgetSettings,
    pub outlier_detection: OutlierDetectionSettings,
    pub health_check: HealthCheckSettings,
    pub circuit_breaker: CircuitBreakerSettings,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSettings {
    /// Retries may add at most this share (percent) to an upstream's request rate.
    pub budget_percent: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionSettings {
    /// Consecutive 5xx answers, lost connections or timeouts that eject an endpoint.
    pub consecutive_5xx: u32,
    /// Consecutive failures to connect that eject an endpoint.
    pub consecutive_local_origin_failure: u32,
    /// The n-th ejection in a row lasts n times this.
    pub base_ejection_time_ms: u64,
    pub max_ejection_time_ms: u64,
    /// At most this share of an upstream's endpoints (percent) is ejected at once; at least
    /// one endpoint always stays.
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSettings {
    /// Polled on every endpoint, below the endpoint URL's path; `interval_ms: 0` turns
    /// active health checks off.
    pub path: String,
    pub interval_ms: u64,
    /// Each interval is longer or shorter by up to this share (percent), at random.
    pub interval_jitter_percent: u32,
    pub timeout_ms: u64,
    /// Consecutive probes without an answer that take an endpoint out of rotation (an
    /// answer other than 2xx takes it out at once).
    pub unhealthy_threshold: u32,
    /// Consecutive 2xx answers that put it back.
    pub healthy_threshold: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    /// Consecutive requests that could not reach any endpoint, while every endpoint is
    /// failing, that open the upstream's breaker.
    pub consecutive_failures: u32,
    /// Then requests are answered 503 at once for this long, and one probes.
    pub open_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// A list, or one string of comma-separated URLs (what an `APP__UPSTREAMS__<NAME>__URLS`
    /// variable can hold).
    #[serde(deserialize_with = "one_or_many")]
    pub urls: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Urls {
        List(Vec<String>),
        Joined(String),
    }
    Ok(match Urls::deserialize(deserializer)? {
        Urls::List(urls) => urls,
        Urls::Joined(joined) => joined.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect(),
    })
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

/// Settings that parse but cannot work, named by key.
#[derive(Debug, thiserror::Error)]
pub enum InvalidSettings {
    #[error("routes: route prefix {0:?} must start with '/' and hold no '{{' or '}}'")]
    Prefix(String),
    #[error("routes: route {prefix}: unknown upstream {upstream:?}")]
    UnknownUpstream { prefix: String, upstream: String },
    #[error("routes: two routes with the prefix {0:?}")]
    DuplicatePrefix(String),
    #[error("upstreams.{0}.urls: no urls")]
    EmptyUpstream(String),
    #[error("upstreams.{name}.urls: {source}")]
    Url { name: String, source: InvalidUrl },
    #[error("proxy.{key}: {reason}")]
    Proxy { key: &'static str, reason: &'static str },
}

/// An upstream as configured and checked: its name and URLs.
#[derive(Clone, Debug)]
pub struct UpstreamTarget {
    pub name: String,
    pub urls: Vec<EndpointUrl>,
}

/// A route as configured and checked. `upstream` indexes [`Routing::upstreams`].
#[derive(Clone, Debug)]
pub struct RouteTarget {
    /// Without a trailing slash.
    pub prefix: String,
    pub upstream: usize,
    /// Without a trailing slash.
    pub upstream_prefix: String,
    pub timeout: Duration,
}

/// Every route and every upstream a route uses, checked.
#[derive(Clone, Debug)]
pub struct Routing {
    pub upstreams: Vec<UpstreamTarget>,
    pub routes: Vec<RouteTarget>,
}

impl Settings {
    /// The routes and their upstreams, or the first setting that cannot work.
    pub fn routing(&self) -> Result<Routing, InvalidSettings> {
        self.proxy.check()?;
        let upstreams = self
            .upstreams
            .iter()
            .map(|(name, upstream)| {
                if upstream.urls.is_empty() {
                    return Err(InvalidSettings::EmptyUpstream(name.clone()));
                }
                let urls = upstream
                    .urls
                    .iter()
                    .map(|url| EndpointUrl::parse(url))
                    .collect::<Result<_, _>>()
                    .map_err(|source| InvalidSettings::Url { name: name.clone(), source })?;
                Ok(UpstreamTarget { name: name.clone(), urls })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut routes: Vec<RouteTarget> = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            if !route.prefix.starts_with('/') || route.prefix.contains(['{', '}']) {
                return Err(InvalidSettings::Prefix(route.prefix.clone()));
            }
            let upstream = upstreams.iter().position(|u| u.name == route.upstream).ok_or_else(|| {
                InvalidSettings::UnknownUpstream { prefix: route.prefix.clone(), upstream: route.upstream.clone() }
            })?;
            let prefix = route.prefix.trim_end_matches('/').to_owned();
            if routes.iter().any(|r| r.prefix == prefix) {
                return Err(InvalidSettings::DuplicatePrefix(route.prefix.clone()));
            }
            routes.push(RouteTarget {
                prefix,
                upstream,
                upstream_prefix: route.upstream_prefix.trim_end_matches('/').to_owned(),
                timeout: Duration::from_millis(route.timeout_ms),
            });
        }
        Ok(Routing { upstreams, routes })
    }
}

impl ProxySettings {
    fn check(&self) -> Result<(), InvalidSettings> {
        let invalid = |key, reason| Err(InvalidSettings::Proxy { key, reason });
        if self.healthy_panic_threshold > 100 {
            return invalid("healthy_panic_threshold", "a percentage: 0 to 100");
        }
        if self.outlier_detection.max_ejection_percent > 100 {
            return invalid("outlier_detection.max_ejection_percent", "a percentage: 0 to 100");
        }
        if self.outlier_detection.consecutive_5xx == 0 || self.outlier_detection.consecutive_local_origin_failure == 0 {
            return invalid(
                "outlier_detection",
                "consecutive_5xx and consecutive_local_origin_failure must be at least 1",
            );
        }
        if self.outlier_detection.max_ejection_time_ms < self.outlier_detection.base_ejection_time_ms {
            return invalid("outlier_detection.max_ejection_time_ms", "must be at least base_ejection_time_ms");
        }
        if !(0.0..=100.0).contains(&self.retry_budget.budget_percent) {
            return invalid("retry_budget.budget_percent", "a percentage: 0 to 100");
        }
        if self.health_check.interval_jitter_percent > 100 {
            return invalid("health_check.interval_jitter_percent", "a percentage: 0 to 100");
        }
        if self.health_check.interval_ms > 0 && !self.health_check.path.starts_with('/') {
            return invalid("health_check.path", "must start with '/'");
        }
        if self.health_check.unhealthy_threshold == 0 || self.health_check.healthy_threshold == 0 {
            return invalid("health_check", "unhealthy_threshold and healthy_threshold must be at least 1");
        }
        if self.circuit_breaker.consecutive_failures == 0 {
            return invalid("circuit_breaker.consecutive_failures", "must be at least 1");
        }
        if self.dns_refresh_ms == 0 {
            return invalid("dns_refresh_ms", "must be at least 1");
        }
        if self.replay_buffer_bytes > self.body_limit_bytes {
            return invalid("replay_buffer_bytes", "must not exceed body_limit_bytes");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        load().expect("the base configuration loads").settings
    }

    #[test]
    fn the_base_configuration_routes_items_to_the_data_service() {
        let routing = settings().routing().unwrap();
        assert_eq!(routing.routes.len(), 1);
        assert_eq!(routing.routes[0].prefix, "/api/v1/items");
        assert_eq!(routing.upstreams[routing.routes[0].upstream].name, "data-service");
    }

    #[test]
    fn upstream_urls_can_come_from_one_environment_variable() {
        let env = std::collections::HashMap::from([(
            "APP__UPSTREAMS__DATA-SERVICE__URLS".to_owned(),
            "http://a:8081, http://b:8081".to_owned(),
        )]);
        let loaded: Settings = settings::load_from(BASE, env).unwrap().settings;
        assert_eq!(loaded.upstreams["data-service"].urls, ["http://a:8081", "http://b:8081"]);
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        type Change = fn(&mut Settings);
        let cases: [(Change, &str); 7] = [
            (|s| s.routes[0].prefix = "api".to_owned(), "route prefix"),
            (|s| s.routes[0].prefix = "/a/{id}".to_owned(), "route prefix"),
            (|s| s.routes[0].upstream = "nowhere".to_owned(), "unknown upstream"),
            (|s| s.upstreams.get_mut("data-service").unwrap().urls.clear(), "upstreams.data-service.urls: no urls"),
            (
                |s| s.upstreams.get_mut("data-service").unwrap().urls = vec!["https://x".to_owned()],
                "upstreams.data-service.urls",
            ),
            (|s| s.proxy.outlier_detection.max_ejection_percent = 101, "proxy.outlier_detection.max_ejection_percent"),
            (|s| s.proxy.health_check.path = "ready".to_owned(), "proxy.health_check.path"),
        ];
        for (change, expected) in cases {
            let mut settings = settings();
            change(&mut settings);
            let error = settings.routing().expect_err(expected).to_string();
            assert!(error.contains(expected), "{error}");
        }
        let mut twice = settings();
        twice.routes.push(twice.routes[0].clone());
        assert!(twice.routing().unwrap_err().to_string().contains("two routes"));
    }
}
