//! What the integration tests of every crate share. Dev-dependency only.
//!
//! - [`TestDatabase`] and [`RedisNamespace`]: a fresh database and key prefix per test on the
//!   machine's Postgres and Redis, removed when dropped, so tests run in parallel and leave
//!   nothing behind;
//! - [`assert_problem`], [`metric_sum`], [`metric_value`], [`assert_promtool_accepts`]: what
//!   a response or a scrape must look like;
//! - [`TcpProxy`]: a connection a test can cut; [`free_port`], [`unique`].

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The machine's Postgres (trust authentication) and Redis.
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
pub const REDIS: &str = "redis://127.0.0.1:6379/0";

/// A name no other test uses.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A TCP port nobody listens on right now (for "connection refused" cases).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// A database name of this test's own on the machine's Postgres (the service under test
/// creates it); dropped, open connections included, when this is.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub fn new(prefix: &str) -> Self {
        Self { name: format!("{prefix}_{}", unique()) }
    }

    pub fn url(&self) -> String {
        format!("{POSTGRES}/{}", self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-c"])
            .arg(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .output();
    }
}

/// A key prefix of this test's own on the machine's Redis; its keys are deleted when this
/// is dropped.
pub struct RedisNamespace {
    pub prefix: String,
}

impl RedisNamespace {
    pub fn new(label: &str) -> Self {
        Self { prefix: format!("test:{label}:{}:", unique()) }
    }
}

impl Drop for RedisNamespace {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "redis-cli -h 127.0.0.1 --scan --pattern '{}*' | xargs -r redis-cli -h 127.0.0.1 del",
                self.prefix
            ))
            .output();
    }
}

/// Asserts a complete problem+json response (RFC 9457) with `status`, carrying the request
/// id of its `X-Request-ID` header, and returns its document.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let request_id = response.headers()["x-request-id"].to_str().expect("request id").to_owned();
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["status"], status);
    assert_eq!(body["type"], "about:blank");
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
    assert_eq!(body["request_id"], request_id.as_str(), "request id in the body matches the header");
    body
}

/// The series of exposition text, as (name, labels, value).
fn samples(text: &str) -> impl Iterator<Item = (&str, HashMap<&str, &str>, f64)> {
    text.lines().filter(|line| !line.starts_with('#')).filter_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (name, label_text) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        let labels = label_text
            .split("\",")
            .filter(|pair| !pair.is_empty())
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key, value.trim_matches('"')))
            })
            .collect();
        Some((name, labels, value.parse().ok()?))
    })
}

/// Sum of every sample of `name` whose labels include `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .filter(|(series, found, _)| *series == name && labels.iter().all(|(k, v)| found.get(k) == Some(v)))
        .map(|(_, _, value)| value)
        .sum()
}

/// The sample `name{labels}` (labels compared as a whole set), `None` when there is none.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: HashMap<&str, &str> = labels.iter().copied().collect();
    samples(text).find(|(series, found, _)| *series == name && *found == wanted).map(|(_, _, value)| value)
}

/// Panics with promtool's findings unless `promtool check metrics` accepts `exposition`
/// without a single remark.
pub fn assert_promtool_accepts(exposition: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (Debian package prometheus; scripts/test installs it)");
    promtool.stdin.take().expect("stdin").write_all(exposition.as_bytes()).expect("write to promtool");
    let output = promtool.wait_with_output().expect("promtool runs");
    let findings = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && findings.trim().is_empty(), "promtool: {findings}\n{exposition}");
}

/// Runs `binary healthcheck` as a container health check would, once against `live_port`
/// (a running service: exit 0) and once against a port nothing listens on (exit 1). Blocking:
/// call it from `spawn_blocking` in async tests.
pub fn assert_healthcheck_subcommand(binary: &str, live_port: u16) {
    let exit_code = |port: u16| {
        Command::new(binary)
            .arg("healthcheck")
            .env("APP__SERVER__PORT", port.to_string())
            .output()
            .expect("the binary runs")
            .status
            .code()
    };
    assert_eq!(exit_code(live_port), Some(0), "healthcheck against the running service");
    assert_eq!(exit_code(free_port()), Some(1), "healthcheck against a closed port");
}

/// A TCP forwarder to `upstream` that a test can cut: while down it closes every existing
/// connection and refuses new ones at once, the way a crashed or partitioned server looks.
pub struct TcpProxy {
    pub address: SocketAddr,
    up: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (up, _) = watch::channel(true);
        let state = up.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = state.subscribe();
                if !*cut.borrow() {
                    continue; // dropped: the client sees the connection closed
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { address, up }
    }

    pub fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

/// For tests that wait for something: fails the test once the time is up.
pub struct Deadline(std::time::Instant);

impl Deadline {
    pub fn after_secs(secs: u64) -> Self {
        Self(std::time::Instant::now() + std::time::Duration::from_secs(secs))
    }

    pub fn check(&self, what: &str) {
        assert!(std::time::Instant::now() < self.0, "timed out waiting for {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "# TYPE a counter\na{x=\"1\",y=\"2\"} 3\na{x=\"1\",y=\"3\"} 4\nb 5\nc{path=\"/v1/items/{id}\",k=\"a,b\"} 6\n";

    #[test]
    fn metric_sum_adds_every_matching_series_and_metric_value_wants_the_exact_set() {
        assert_eq!(metric_sum(TEXT, "a", &[("x", "1")]), 7.0);
        assert_eq!(metric_sum(TEXT, "a", &[("y", "3")]), 4.0);
        assert_eq!(metric_sum(TEXT, "b", &[]), 5.0);
        assert_eq!(metric_value(TEXT, "a", &[("x", "1")]), None);
        assert_eq!(metric_value(TEXT, "a", &[("y", "2"), ("x", "1")]), Some(3.0));
        assert_eq!(metric_value(TEXT, "c", &[("path", "/v1/items/{id}"), ("k", "a,b")]), Some(6.0));
    }
}
