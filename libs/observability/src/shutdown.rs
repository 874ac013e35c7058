//! Graceful shutdown as an explicit drain:
//!
//! 1. SIGTERM or SIGINT arrives: readiness turns 503 at once;
//! 2. the server keeps serving for `drain_delay_secs`, while load balancers notice and stop
//!    sending new requests;
//! 3. the server stops accepting and gives in-flight requests up to `grace_period_secs`
//!    (set on the server with `HttpServer::shutdown_timeout`) to finish;
//! 4. [`serve_until_stopped`] returns `Ok`, and the process exits 0.
//!
//! A second signal during the drain skips the rest of the delay.
//!
//! The server must be built with `disable_signals()`: actix's own handlers would stop it at
//! once, before readiness has had a chance to turn.

use std::time::Duration;

use actix_web::dev::Server;
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};

use crate::health::HealthRegistry;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long to keep serving, unready, before the listener closes.
    pub drain_delay_secs: u64,
    /// How long in-flight requests get to finish once the listener has closed.
    pub grace_period_secs: u64,
}

/// Runs `server` until it stops on its own or a signal has been handled as above.
pub async fn serve_until_stopped(
    server: Server,
    health: HealthRegistry,
    settings: &ShutdownSettings,
) -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let handle = server.handle();
    let drain_delay = Duration::from_secs(settings.drain_delay_secs);

    let drain = async {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        };
        health.begin_draining();
        tracing::info!(
            signal = name,
            drain_delay_secs = drain_delay.as_secs(),
            "shutdown: readiness is now 503, draining"
        );
        tokio::select! {
            () = tokio::time::sleep(drain_delay) => {}
            _ = terminate.recv() => tracing::warn!("second signal: skipping the rest of the drain delay"),
            _ = interrupt.recv() => tracing::warn!("second signal: skipping the rest of the drain delay"),
        }
    };

    tokio::pin!(server);
    tokio::select! {
        // Stopped without being asked to: pass its outcome on.
        result = &mut server => return result,
        () = drain => {}
    }
    tracing::info!("shutdown: no longer accepting connections; waiting for in-flight requests");
    // The server future processes the stop command, so both must be polled together.
    let ((), result) = tokio::join!(handle.stop(true), server);
    result?;
    tracing::info!("shutdown: complete");
    Ok(())
}
