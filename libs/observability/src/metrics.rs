//! The process-wide Prometheus recorder, the standard HTTP metric names and the exposition
//! handler.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use actix_web::{HttpResponse, web};
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::ServiceInfo;
use crate::server::get_or_head;

pub const REQUESTS_TOTAL: &str = "api_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "api_request_duration_seconds";
pub const ACTIVE_REQUESTS: &str = "api_active_requests";
pub const BUILD_INFO: &str = "app_build_info";

/// Latency buckets for every `*_duration_seconds` histogram: 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The text exposition format, version 0.0.4, as Prometheus expects it.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often histograms are drained and idle data compacted. Without it the exporter's
/// histogram storage grows without bound between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct MetricsError(String);

/// Metric handles cached by their varying label values. Looking a handle up in the registry
/// hashes and allocates the whole label set; on a per-request path, resolve it once here.
/// Label values must come from a bounded set, as for any metric.
pub struct HandleCache<K, H> {
    handles: RwLock<HashMap<K, H>>,
}

impl<K: Hash + Eq + Clone, H: Clone> HandleCache<K, H> {
    pub fn new() -> Self {
        Self { handles: RwLock::new(HashMap::new()) }
    }

    /// The handle for `key`, registered with `register` the first time.
    pub fn get(&self, key: &K, register: impl FnOnce(&K) -> H) -> H {
        if let Some(handle) = self.handles.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return handle.clone();
        }
        let mut handles = self.handles.write().unwrap_or_else(PoisonError::into_inner);
        handles.entry(key.clone()).or_insert_with(|| register(key)).clone()
    }
}

impl<K: Hash + Eq + Clone, H: Clone> Default for HandleCache<K, H> {
    fn default() -> Self {
        Self::new()
    }
}

/// Refreshes gauges that are read rather than counted (pool sizes, queue lengths).
pub type Collector = Arc<dyn Fn() + Send + Sync>;

/// Renders the process's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
    collectors: Vec<Collector>,
}

impl Metrics {
    /// Installs the global recorder (once per process; later calls share it), describes the
    /// standard metrics, sets `app_build_info` and starts the upkeep thread.
    pub fn install(service: &ServiceInfo) -> Result<Self, MetricsError> {
        let handle = RECORDER
            .get_or_init(|| {
                let handle = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".to_owned()), DURATION_BUCKETS)
                    .and_then(PrometheusBuilder::install_recorder)
                    .map_err(|e: BuildError| e.to_string())?;
                describe_http_metrics();
                spawn_upkeep(handle.clone());
                Ok(handle)
            })
            .clone()
            .map_err(MetricsError)?;
        gauge!(BUILD_INFO, "service" => service.name, "version" => service.version).set(1.0);
        let process = metrics_process::Collector::default();
        process.describe();
        Ok(Self { handle, process, collectors: Vec::new() })
    }

    /// Runs `collector` right before every render.
    pub fn with_collector(mut self, collector: impl Fn() + Send + Sync + 'static) -> Self {
        self.collectors.push(Arc::new(collector));
        self
    }

    /// The current exposition text, process metrics and collectors refreshed first.
    pub fn render(&self) -> String {
        self.process.collect();
        for collector in &self.collectors {
            collector();
        }
        self.handle.render()
    }
}

fn describe_http_metrics() {
    describe_counter!(REQUESTS_TOTAL, Unit::Count, "HTTP requests served, by method, route template and status.");
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time to produce an HTTP response, by method and route template."
    );
    describe_gauge!(
        ACTIVE_REQUESTS,
        Unit::Count,
        "HTTP requests being served right now, by method and route template."
    );
    describe_gauge!(BUILD_INFO, "Always 1; labels carry the service name and version.");
}

fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("metrics-upkeep".to_owned()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        }
    });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the metrics upkeep thread; histograms will grow until scraped");
    }
}

/// `GET /metrics`: needs `web::Data<Metrics>`. Rendering reads /proc and formats a few
/// hundred lines: well under a millisecond, so it runs inline.
pub async fn metrics_handler(metrics: web::Data<Metrics>) -> HttpResponse {
    HttpResponse::Ok().content_type(CONTENT_TYPE).body(metrics.render())
}

/// Registers `GET /metrics` with its data.
pub fn configure_metrics(metrics: Metrics) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(web::Data::new(metrics)).route("/metrics", get_or_head().to(metrics_handler));
    }
}
