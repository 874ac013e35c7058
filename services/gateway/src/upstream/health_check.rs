//! Active health checks: the gateway asks every endpoint for `proxy.health_check.path`
//! (`/ready`) every interval, jittered so that gateways do not probe in step.
//!
//! An endpoint that answers anything but 2xx (a draining instance answers 503 from the
//! moment it got SIGTERM) leaves rotation at once, before it closes its listener; one that
//! does not answer at all leaves after `unhealthy_threshold` probes in a row. It comes back
//! after `healthy_threshold` 2xx answers in a row. A 2xx answer also ends an outlier
//! ejection when the endpoint comes back from a failed check (a restart) or was ejected for
//! failed connects, which the answer disproves: a restarted instance takes requests again as
//! soon as it is ready, without waiting out its ejection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::Empty;
use hyper::Request;
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::discovery::EndpointUrl;
use super::endpoints::Endpoint;
use crate::configuration::HealthCheckSettings;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Ready,
    /// An answer, but not 2xx.
    Unready(u16),
    /// No answer: refused, reset or timed out.
    NoAnswer(String),
}

/// What a probe changed for its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    WentOut,
    CameBack,
}

/// The policy, from `proxy.health_check`.
#[derive(Clone, Debug)]
pub struct HealthCheck {
    pub path: String,
    interval: Duration,
    jitter_percent: u32,
    timeout: Duration,
    unhealthy_threshold: u32,
    healthy_threshold: u32,
}

impl HealthCheck {
    /// `None` when active health checks are off (`interval_ms: 0`).
    pub fn new(settings: &HealthCheckSettings) -> Option<Self> {
        (settings.interval_ms > 0).then(|| Self {
            path: settings.path.clone(),
            interval: Duration::from_millis(settings.interval_ms),
            jitter_percent: settings.interval_jitter_percent.min(100),
            timeout: Duration::from_millis(settings.timeout_ms),
            unhealthy_threshold: settings.unhealthy_threshold.max(1),
            healthy_threshold: settings.healthy_threshold.max(1),
        })
    }

    /// The wait before the next round: the interval, up to `jitter_percent` longer or shorter.
    pub fn next_interval(&self) -> Duration {
        let spread = self.interval.as_secs_f64() * f64::from(self.jitter_percent) / 100.0;
        Duration::from_secs_f64((self.interval.as_secs_f64() + spread * (2.0 * fastrand::f64() - 1.0)).max(0.001))
    }

    pub async fn probe(&self, endpoint: &Endpoint) -> Probe {
        let path = format!("{}{}", endpoint.url.path, self.path);
        match tokio::time::timeout(self.timeout, get(endpoint.address, &endpoint.url, &path)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => Probe::Ready,
            Ok(Ok(status)) => Probe::Unready(status),
            Ok(Err(cause)) => Probe::NoAnswer(cause),
            Err(_) => Probe::NoAnswer(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }

    /// Counts `probe` for `endpoint` and moves it in or out of rotation.
    pub fn apply(&self, endpoint: &Endpoint, probe: &Probe) -> Transition {
        let counts = &endpoint.health_probes;
        let healthy = endpoint.is_healthy();
        match probe {
            Probe::Ready => {
                counts.missed.store(0, Ordering::Relaxed);
                let passed = counts.passed.fetch_add(1, Ordering::Relaxed) + 1;
                if !healthy && passed >= self.healthy_threshold {
                    endpoint.set_healthy(true);
                    return Transition::CameBack;
                }
            }
            Probe::Unready(_) | Probe::NoAnswer(_) => {
                counts.passed.store(0, Ordering::Relaxed);
                let missed = counts.missed.fetch_add(1, Ordering::Relaxed) + 1;
                let out = matches!(probe, Probe::Unready(_)) || missed >= self.unhealthy_threshold;
                if healthy && out {
                    endpoint.set_healthy(false);
                    return Transition::WentOut;
                }
            }
        }
        Transition::None
    }
}

/// `GET path` on a connection of its own, closed afterwards; the status code.
async fn get(address: SocketAddr, url: &EndpointUrl, path: &str) -> Result<u16, String> {
    let stream = TcpStream::connect(address).await.map_err(|e| format!("connecting: {e}"))?;
    let (mut sender, connection) =
        http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("handshake: {e}"))?;
    // Ends when the response is read and the connection closes (or the probe is dropped).
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, url.host_header.clone())
        .header(hyper::header::CONNECTION, "close")
        .header(hyper::header::USER_AGENT, "stackline-gateway-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let status = sender.send_request(request).await.map(|response| response.status().as_u16());
    driver.abort();
    status.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(unhealthy_threshold: u32, healthy_threshold: u32) -> HealthCheck {
        HealthCheck::new(&HealthCheckSettings {
            path: "/ready".to_owned(),
            interval_ms: 1000,
            interval_jitter_percent: 20,
            timeout_ms: 100,
            unhealthy_threshold,
            healthy_threshold,
        })
        .unwrap()
    }

    #[test]
    fn intervals_are_jittered_within_the_bounds() {
        let check = check(2, 1);
        for _ in 0..100 {
            let interval = check.next_interval();
            assert!((Duration::from_millis(800)..=Duration::from_millis(1200)).contains(&interval), "{interval:?}");
        }
        let off = HealthCheckSettings {
            path: "/ready".into(),
            interval_ms: 0,
            interval_jitter_percent: 0,
            timeout_ms: 1,
            unhealthy_threshold: 1,
            healthy_threshold: 1,
        };
        assert!(HealthCheck::new(&off).is_none());
    }
}
