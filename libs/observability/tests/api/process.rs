//! The demo example run as a real process: signals, drain, exit codes, configuration errors.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::metric_value;

/// `cargo test` and `cargo nextest` build examples next to the test binaries' `deps/`.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
    let demo = profile_dir.join("examples").join("demo");
    assert!(demo.is_file(), "{} not built: run the tests with cargo test or cargo nextest", demo.display());
    demo
}

struct Demo {
    child: Child,
    lines: mpsc::Receiver<Value>,
    address: String,
}

impl Demo {
    /// Starts the demo on a free port, ready-checking a listener this test owns.
    fn start(drain_delay_secs: u64, dependency: &TcpListener) -> Self {
        let mut child = Command::new(demo_binary())
            .env("APP__SERVER__PORT", "0")
            .env("APP__SERVER__WORKERS", "1")
            .env("APP__SHUTDOWN__DRAIN_DELAY_SECS", drain_delay_secs.to_string())
            .env("APP__SHUTDOWN__GRACE_PERIOD_SECS", "20")
            .env("APP__DEPENDENCY", dependency.local_addr().unwrap().to_string())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn demo");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("non-JSON line ({e}): {line}"));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        let listening = wait_for_line(&lines, |l| l["msg"] == "listening");
        let address = format!("http://{}", listening["address"].as_str().unwrap());
        Self { child, lines, address }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    fn wait_for_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "demo did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_line(lines: &mpsc::Receiver<Value>, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|_| panic!("expected log line never came; saw {seen:#?}"));
        seen.push(line["msg"].clone());
        if matches(&line) {
            return line;
        }
    }
}

// Multi-threaded: the in-flight request runs while this thread blocks reading log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_finishes_in_flight_requests_and_exits_zero() {
    let dependency = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut demo = Demo::start(2, &dependency);
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{}/ready", demo.address)).send().await.unwrap().status(), 200);

    // A request that is still being served when the listener closes, 2 s after SIGTERM.
    let in_flight = tokio::spawn(client.get(format!("{}/work?ms=3500", demo.address)).send());
    wait_for_line(&demo.lines, |l| l["msg"].as_str().is_some_and(|m| m.ends_with("work started")));

    demo.signal("TERM");
    wait_for_line(&demo.lines, |l| l["msg"].as_str().is_some_and(|m| m.starts_with("shutdown: readiness")));
    let ready = client.get(format!("{}/ready", demo.address)).send().await.unwrap();
    assert_eq!(ready.status(), 503, "unready during the drain");
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "draining");
    let hello = client.get(format!("{}/hello", demo.address)).send().await.unwrap();
    assert_eq!(hello.status(), 200, "still serving during the drain");
    assert_eq!(hello.headers()["connection"], "close", "keep-alive clients are sent elsewhere");
    let head = client.head(format!("{}/health", demo.address)).send().await.unwrap();
    assert_eq!(head.status(), 200, "HEAD is answered wherever GET is");
    let metrics = client.get(format!("{}/metrics", demo.address)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&metrics, "api_active_requests", &[("method", "GET"), ("endpoint", "/work")]), Some(1.0));

    let response = in_flight.await.unwrap().expect("in-flight request completes");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "done\n");

    let status = demo.wait_for_exit();
    assert_eq!(status.code(), Some(0));
    // The background task ran once more after the last request, then the process finished.
    wait_for_line(&demo.lines, |l| l["msg"].as_str().is_some_and(|m| m.starts_with("shutdown: no longer accepting")));
    wait_for_line(&demo.lines, |l| l["msg"] == "flushed");
    wait_for_line(&demo.lines, |l| l["msg"] == "shutdown: complete");
}

#[tokio::test]
async fn outside_a_drain_connections_are_kept_alive() {
    let dependency = TcpListener::bind("127.0.0.1:0").unwrap();
    let demo = Demo::start(0, &dependency);
    let hello = reqwest::get(format!("{}/hello", demo.address)).await.unwrap();
    assert_eq!(hello.status(), 200);
    assert!(hello.headers().get("connection").is_none_or(|value| value != "close"), "{:?}", hello.headers());
}

#[tokio::test]
async fn sigint_is_graceful_too() {
    let dependency = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut demo = Demo::start(0, &dependency);
    demo.signal("INT");
    assert_eq!(demo.wait_for_exit().code(), Some(0));
}

#[test]
fn a_bad_setting_exits_non_zero_with_one_line_naming_the_key() {
    for (key, value, expected) in [
        ("APP__SERVER__PORT", "eighty", "server.port"),
        ("APP__SHUTDOWN__DRAIN_DELAY_SECS", "-1", "shutdown.drain_delay_secs"),
        ("APP__LOG__LEVEL", "app=loud", "log.level"),
    ] {
        let output = Command::new(demo_binary())
            .env(key, value)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{key}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line, no backtrace: {stderr}");
        assert!(stderr.contains(expected), "{key}={value}: {stderr}");
        assert!(output.stdout.is_empty(), "nothing started");
    }
}
