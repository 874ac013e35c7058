//! Helpers the integration tests of every crate share. Dev-dependency only.

use std::io::Write;
use std::process::{Command, Stdio};

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

/// Drops a per-test database on the machine's Postgres, open connections included.
pub fn drop_database(name: &str) {
    let _ = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-q", "-c"])
        .arg(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .output();
}

/// Deletes every key under `prefix` on the machine's Redis.
pub fn delete_redis_keys(prefix: &str) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("redis-cli -h 127.0.0.1 --scan --pattern '{prefix}*' | xargs -r redis-cli -h 127.0.0.1 del"))
        .output();
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
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    assert_eq!(exit_code(closed), Some(1), "healthcheck against a closed port");
}
