//! Graceful shutdown as an explicit drain:
//!
//! 1. SIGTERM or SIGINT arrives: readiness turns 503 at once, and every response carries
//!    `Connection: close` ([`CloseWhileDraining`]), so keep-alive clients (proxies, load
//!    balancers, pooled HTTP clients) open their next connection elsewhere;
//! 2. the server keeps serving for `drain_delay_secs`, while load balancers notice and stop
//!    sending new requests;
//! 3. the server stops accepting and gives in-flight requests up to `grace_period_secs`
//!    (set on the server with `HttpServer::shutdown_timeout`) to finish;
//! 4. the service's [`BackgroundTasks`] stop (after the last request they could serve), and
//!    [`serve_until_stopped`] returns `Ok`: the process exits 0.
//!
//! A second signal during the drain skips the rest of the delay.
//!
//! The server must be built with `disable_signals()`: actix's own handlers would stop it at
//! once, before readiness has had a chance to turn.

use std::future::{Future, Ready, ready};
use std::time::Duration;

use actix_web::dev::{Server, Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::ConnectionType;
use futures_util::future::{Either, MapOk, TryFutureExt};
use serde::Deserialize;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::health::HealthRegistry;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// How long to keep serving, unready, before the listener closes.
    pub drain_delay_secs: u64,
    /// How long in-flight requests get to finish once the listener has closed.
    pub grace_period_secs: u64,
}

/// How long stopping background tasks may take: a task stops between two runs, so this
/// bounds one run (a probe, a retry, a purge), each of which has a shorter timeout of its own.
const BACKGROUND_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `server` until it stops on its own or a signal has been handled as above; then
/// stops `background`.
pub async fn serve_until_stopped(
    server: Server,
    health: HealthRegistry,
    background: BackgroundTasks,
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
            "shutdown: readiness is now 503 and connections close after each response, draining"
        );
        tokio::select! {
            () = tokio::time::sleep(drain_delay) => {}
            _ = terminate.recv() => tracing::warn!("second signal: skipping the rest of the drain delay"),
            _ = interrupt.recv() => tracing::warn!("second signal: skipping the rest of the drain delay"),
        }
    };

    tokio::pin!(server);
    let result = tokio::select! {
        // Stopped without being asked to: pass its outcome on.
        result = &mut server => result,
        () = drain => {
            tracing::info!("shutdown: no longer accepting connections; waiting for in-flight requests");
            // The server future processes the stop command, so both must be polled together.
            let ((), result) = tokio::join!(handle.stop(true), server);
            result
        }
    };
    background.stop().await;
    result?;
    tracing::info!("shutdown: complete");
    Ok(())
}

/// The loops a service runs beside its server (refreshing, probing, retrying, purging).
/// They run on the runtime that spawned them, not on a server worker, and stop once the
/// server has drained: after the last request whose work they could still be part of.
/// Dropped without [`BackgroundTasks::stop`], they are aborted.
pub struct BackgroundTasks {
    stopping: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Default for BackgroundTasks {
    fn default() -> Self {
        Self::new()
    }
}

impl BackgroundTasks {
    pub fn new() -> Self {
        Self { stopping: watch::Sender::new(false), tasks: Vec::new() }
    }

    /// Runs `run` after every `period()` (asked anew each time, so it may be jittered)
    /// until the service stops. A run in progress when the service stops completes.
    pub fn every<P, F, R>(&mut self, name: &'static str, period: P, run: F)
    where
        P: FnMut() -> Duration + Send + 'static,
        F: FnMut() -> R + Send + 'static,
        R: Future<Output = ()> + Send,
    {
        self.spawn(name, period, run, false);
    }

    /// As [`Self::every`], and once more when the service stops: for work that must not be
    /// left undone by a restart (updates still to apply).
    pub fn every_and_at_stop<P, F, R>(&mut self, name: &'static str, period: P, run: F)
    where
        P: FnMut() -> Duration + Send + 'static,
        F: FnMut() -> R + Send + 'static,
        R: Future<Output = ()> + Send,
    {
        self.spawn(name, period, run, true);
    }

    fn spawn<P, F, R>(&mut self, name: &'static str, mut period: P, mut run: F, run_at_stop: bool)
    where
        P: FnMut() -> Duration + Send + 'static,
        F: FnMut() -> R + Send + 'static,
        R: Future<Output = ()> + Send,
    {
        let mut stopping = self.stopping.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let stopped = tokio::select! {
                    biased;
                    _ = stopping.wait_for(|stopping| *stopping) => true,
                    () = tokio::time::sleep(period()) => false,
                };
                if stopped {
                    break;
                }
                run().await;
            }
            if run_at_stop {
                run().await;
            }
        });
        self.tasks.push((name, task));
    }

    /// Signals every task to stop and waits for them (each at most a few seconds).
    pub async fn stop(mut self) {
        self.stopping.send_replace(true);
        for (name, task) in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(BACKGROUND_STOP_TIMEOUT, task).await.is_err() {
                abort.abort();
                tracing::warn!(task = name, "background task did not stop in time; aborted");
            }
        }
    }
}

impl Drop for BackgroundTasks {
    fn drop(&mut self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

/// While the service drains, every response asks the client to close its connection, so a
/// client that keeps connections alive (a proxy's pool above all) opens its next one to
/// another instance instead of finding this one gone. Requests already in flight when the
/// drain begins keep their connection; the next response on it closes it.
#[derive(Clone)]
pub struct CloseWhileDraining(pub HealthRegistry);

impl<S, B> Transform<S, ServiceRequest> for CloseWhileDraining
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = CloseWhileDrainingMiddleware<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(CloseWhileDrainingMiddleware { service, health: self.0.clone() }))
    }
}

pub struct CloseWhileDrainingMiddleware<S> {
    service: S,
    health: HealthRegistry,
}

type CloseConnection<B> = fn(ServiceResponse<B>) -> ServiceResponse<B>;

fn close_connection<B>(mut response: ServiceResponse<B>) -> ServiceResponse<B> {
    response.response_mut().head_mut().set_connection_type(ConnectionType::Close);
    response
}

impl<S, B> Service<ServiceRequest> for CloseWhileDrainingMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    // Not boxed: outside a drain this is the inner future itself.
    type Future = Either<MapOk<S::Future, CloseConnection<B>>, S::Future>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let response = self.service.call(req);
        if self.health.is_draining() {
            Either::Left(response.map_ok(close_connection as CloseConnection<B>))
        } else {
            Either::Right(response)
        }
    }
}
