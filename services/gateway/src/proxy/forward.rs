//! The middle phases of a proxied request: choose an endpoint, send, and send again when
//! that is safe and within the budget.
//!
//! A retry goes to another endpoint when there is one. What may be retried:
//! - a request that never left the gateway (no connection could be made), whatever its
//!   method: its body is still here, since a body is handed over only once a connection is;
//! - a request that was sent and lost (the connection failed before an answer) or answered
//!   503, when it is safe to repeat: an idempotent method, or a POST carrying an
//!   `Idempotency-Key` (the data service deduplicates it), and a body the gateway kept
//!   (bodies up to `proxy.replay_buffer_bytes` are read whole before sending).
//!
//! All within `proxy.max_retries`, the route's deadline and the upstream's retry budget.

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use actix_web::http::Method;
use actix_web::web::{Bytes, BytesMut, Payload};
use futures_util::StreamExt;
use hyper::body::Incoming;
use tokio::time::Sleep;

use super::Route;
use super::admission::declared_length;
use super::failure::Failure;
use super::headers::ForwardedHead;
use crate::client::{ClientBody, PooledConnection, RequestBody, SendFailure, UpstreamClient};
use crate::upstream::RetryReason;
use crate::upstream::breaker::Admission;
use crate::upstream::endpoints::InFlight;
use crate::upstream::outlier::Outcome;

/// An upstream's answer: the response head, its connection, and the endpoint's in-flight
/// count (held until the response has been relayed).
pub struct Forwarded {
    pub response: hyper::Response<Incoming>,
    pub connection: PooledConnection,
    pub in_flight: InFlight,
}

/// The request body, as the attempts need it.
enum OutgoingBody {
    Empty,
    /// Read whole: every attempt sends a copy (a reference-counted one).
    Kept(Bytes),
    /// Streamed from the client: only one attempt can take it, unless it comes back unsent.
    Streamed {
        body: Option<ClientBody>,
        waiting_for_client: Rc<Cell<bool>>,
    },
}

/// The request to forward: what every attempt needs.
pub struct Outgoing<'r> {
    req: &'r HttpRequest,
    route: &'r Route,
    key_id: &'r str,
    body: OutgoingBody,
    body_limit: u64,
    /// An idempotent method or a keyed POST: safe to send again after it was sent.
    safe_to_repeat: bool,
}

impl<'r> Outgoing<'r> {
    /// Prepares the request; a declared body of up to `replay_buffer` bytes is read whole
    /// here, under the route's deadline (`timer`).
    pub async fn prepare(
        req: &'r HttpRequest,
        route: &'r Route,
        key_id: &'r str,
        payload: Payload,
        limits: BodyLimits,
        timer: Pin<&mut Sleep>,
    ) -> Result<Outgoing<'r>, Failure> {
        let headers = req.headers();
        let declared = declared_length(headers);
        let chunked = headers.contains_key(actix_web::http::header::TRANSFER_ENCODING);
        let body = match declared {
            Some(0) | None if !chunked => OutgoingBody::Empty,
            Some(length) if length <= limits.replay_buffer => {
                OutgoingBody::Kept(read_whole(payload, length, timer).await?)
            }
            _ => {
                let (body, waiting_for_client) = ClientBody::new(payload, limits.body_limit);
                OutgoingBody::Streamed { body: Some(body), waiting_for_client }
            }
        };
        let safe_to_repeat = is_idempotent(req.method())
            || (req.method() == Method::POST && headers.contains_key(idempotency_key::HEADER));
        Ok(Self { req, route, key_id, body, body_limit: limits.body_limit, safe_to_repeat })
    }

    /// Whether a sent request may be sent again: safe to repeat, with its body still here.
    fn repeatable(&self) -> bool {
        self.safe_to_repeat && !matches!(self.body, OutgoingBody::Streamed { .. })
    }

    /// The body for the next attempt; `None` once a streamed body has been sent.
    fn body_for_attempt(&mut self) -> Option<RequestBody> {
        match &mut self.body {
            OutgoingBody::Empty => Some(RequestBody::Empty),
            OutgoingBody::Kept(bytes) => Some(RequestBody::Full(Some(bytes.clone()))),
            OutgoingBody::Streamed { body, .. } => body.take().map(RequestBody::Streamed),
        }
    }

    /// A request that was never sent gives its body back for the next attempt.
    fn give_back(&mut self, body: RequestBody) {
        if let (OutgoingBody::Streamed { body: slot, .. }, RequestBody::Streamed(unsent)) = (&mut self.body, body) {
            *slot = Some(unsent);
        }
    }

    /// Whether the client is the one keeping the exchange waiting (its body has not all
    /// arrived and the gateway is waiting for more).
    fn waiting_for_client(&self) -> bool {
        matches!(&self.body, OutgoingBody::Streamed { body: None, waiting_for_client } if waiting_for_client.get())
    }
}

#[derive(Clone, Copy)]
pub struct BodyLimits {
    pub body_limit: u64,
    pub replay_buffer: u64,
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// The client's whole body, which declared `length` bytes.
async fn read_whole(mut payload: Payload, length: u64, mut timer: Pin<&mut Sleep>) -> Result<Bytes, Failure> {
    let mut body = BytesMut::with_capacity(usize::try_from(length).unwrap_or(0));
    loop {
        let chunk = tokio::select! {
            biased;
            chunk = payload.next() => chunk,
            () = timer.as_mut() => return Err(Failure::BodyIncomplete),
        };
        match chunk {
            Some(Ok(chunk)) => body.extend_from_slice(&chunk),
            Some(Err(error)) => return Err(Failure::BodyBroken(error.to_string())),
            None => return Ok(body.freeze()),
        }
    }
}

/// The addresses a request has tried (the first few), for the next choice to avoid.
struct Tried {
    addresses: [SocketAddr; 4],
    count: usize,
}

impl Tried {
    fn new() -> Self {
        Self { addresses: [SocketAddr::from(([0, 0, 0, 0], 0)); 4], count: 0 }
    }

    fn push(&mut self, address: SocketAddr) {
        if let Some(slot) = self.addresses.get_mut(self.count) {
            *slot = address;
            self.count += 1;
        }
    }

    fn as_slice(&self) -> &[SocketAddr] {
        &self.addresses[..self.count]
    }
}

/// Sends `outgoing` to the route's upstream, retrying as the module explains, until an
/// answer, a failure not worth retrying, or the deadline.
pub async fn forward(
    mut outgoing: Outgoing<'_>,
    client: &Rc<UpstreamClient>,
    max_retries: u32,
    deadline: Instant,
    mut timer: Pin<&mut Sleep>,
) -> Result<Forwarded, Failure> {
    let upstream = &outgoing.route.upstream;
    if let Admission::Shed(retry_after_secs) = upstream.admit() {
        return Err(Failure::Shed { retry_after_secs });
    }
    upstream.deposit_retry_budget();
    let mut tried = Tried::new();
    let mut retries = 0;
    loop {
        let Some(endpoint) = upstream.endpoints.choose(tried.as_slice()) else {
            return Err(Failure::NoEndpoint);
        };
        tried.push(endpoint.address);
        let Some(body) = outgoing.body_for_attempt() else {
            return Err(Failure::Internal("the streamed request body was already sent".to_owned()));
        };
        let head = ForwardedHead::new(outgoing.req, outgoing.route, outgoing.key_id)
            .ok_or_else(|| Failure::Internal("a method hyper cannot send".to_owned()))?;
        let request = head.into_request(&endpoint, body).map_err(Failure::Internal)?;

        let in_flight = endpoint.start();
        let started = Instant::now();
        let sent = tokio::select! {
            biased;
            sent = client.send(endpoint.address, request) => sent,
            () = timer.as_mut() => {
                if outgoing.waiting_for_client() {
                    return Err(Failure::BodyIncomplete);
                }
                upstream.endpoints.record(&endpoint, Outcome::TimedOut, started.elapsed());
                return Err(Failure::TimedOut);
            }
        };
        let elapsed = started.elapsed();
        let (result, retry_reason) = match sent {
            Ok((response, connection)) => {
                let status = response.status().as_u16();
                upstream.endpoints.record(&endpoint, Outcome::Answered(status), elapsed);
                let retry = (status == 503 && outgoing.repeatable()).then_some(RetryReason::Unavailable);
                (Ok(Forwarded { response, connection, in_flight }), retry)
            }
            Err(SendFailure::NotSent { cause, request }) => {
                upstream.endpoints.record(&endpoint, Outcome::ConnectFailed, elapsed);
                outgoing.give_back(request.into_body());
                let failure = Failure::NotSent(cause);
                let retry = failure.retry_reason(outgoing.repeatable());
                (Err(failure), retry)
            }
            Err(SendFailure::ConnectionLost(cause)) => {
                upstream.endpoints.record(&endpoint, Outcome::ConnectionLost, elapsed);
                let failure = Failure::ConnectionLost(cause);
                let retry = failure.retry_reason(outgoing.repeatable());
                (Err(failure), retry)
            }
            Err(SendFailure::BodyTooLarge) => return Err(Failure::BodyTooLarge { limit: outgoing.body_limit }),
            Err(SendFailure::ClientBodyBroken(cause)) => return Err(Failure::BodyBroken(cause)),
        };
        let Some(reason) = retry_reason else { return result };
        if retries >= max_retries || Instant::now() >= deadline || !upstream.withdraw_retry(reason) {
            return result;
        }
        retries += 1;
        if let Err(failure) = &result {
            tracing::info!(upstream = %upstream.name, endpoint = %endpoint.address, cause = failure.cause(), retry = retries, "retrying on another endpoint");
        }
        // An answer being retried is dropped unread; its connection closes.
        drop(result);
        if reason != RetryReason::NotSent {
            // The endpoint was reached and is struggling: give it a moment.
            let backoff = Duration::from_millis(fastrand::u64(10..=25) * u64::from(retries));
            let backoff_until = Instant::now() + backoff;
            if backoff_until >= deadline {
                return Err(Failure::TimedOut);
            }
            tokio::time::sleep_until(backoff_until.into()).await;
        }
    }
}
