//! The `healthcheck` subcommand of every service binary: GET the service's own `/health` and
//! exit 0 when it answers 200, 1 otherwise. Container `HEALTHCHECK`s run it, because the
//! runtime images have no shell and no curl.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use crate::server::ServerSettings;
use crate::settings::SettingsError;

/// The whole probe (connect, request, status line) fits in this.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("GET http://{address}/health: {source}")]
    Io { address: SocketAddr, source: std::io::Error },
    #[error("GET http://{address}/health answered {status_line:?}")]
    Unhealthy { address: SocketAddr, status_line: String },
}

/// Where the service can be reached from inside its own container: a wildcard listen
/// address becomes loopback.
fn own_address(server: &ServerSettings) -> Result<SocketAddr, ProbeError> {
    let address = server
        .address()
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| ProbeError::Resolve(server.address()))?;
    Ok(match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), address.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), address.port()),
        _ => address,
    })
}

/// GETs `/health` on the service described by `server`; `Ok` on a 200.
pub fn probe(server: &ServerSettings) -> Result<(), ProbeError> {
    let address = own_address(server)?;
    let io = |source| ProbeError::Io { address, source };
    let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
    let request =
        format!("GET /health HTTP/1.1\r\nHost: {address}\r\nUser-Agent: healthcheck\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    // The status line is all that matters; it arrives first.
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let read = stream.read(&mut chunk).map_err(io)?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let status_line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().trim().to_owned();
    match status_line.split(' ').nth(1) {
        Some("200") if status_line.starts_with("HTTP/1.") => Ok(()),
        _ => Err(ProbeError::Unhealthy { address, status_line }),
    }
}

/// The subcommand: `server` comes from the service's own configuration, loaded exactly as
/// the server loads it (same `APP_ENV`, files and `APP__...` variables).
pub fn run(service: &str, server: Result<ServerSettings, SettingsError>) -> ExitCode {
    let outcome =
        server.map_err(|error| error.to_string()).and_then(|server| probe(&server).map_err(|e| e.to_string()));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{service} healthcheck: {error}");
            ExitCode::FAILURE
        }
    }
}
