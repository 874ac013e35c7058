//! The upstream client: HTTP/1.1 keep-alive connections, pooled per worker thread.
//!
//! Built on hyper's connection API rather than a general-purpose client: a connection keeps
//! its buffers and its task for as long as it lives, so a request costs one message to that
//! task. (awc built a new codec, with its own clock-refresh task, for every request: about
//! a tenth of the gateway's CPU.) A pool belongs to one worker thread and is never shared.
//!
//! A send reports whether the request left the gateway: one that was never written (no
//! connection could be made, or a new connection closed before it was written) comes back
//! whole, body included, to be sent to another endpoint.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::web::{Bytes, Payload};
use futures_util::Stream;
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Idle connections kept per upstream endpoint and worker; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// The body of a request to an upstream.
pub enum RequestBody {
    Empty,
    /// Read whole before sending (small bodies): can be sent again.
    Full(Option<Bytes>),
    /// The client's body, passed on as it arrives.
    Streamed(ClientBody),
}

/// The client's body as it arrives, failed once more than `remaining` bytes have come, so
/// an oversized body is refused without being held in memory.
pub struct ClientBody {
    payload: Payload,
    remaining: u64,
    /// Whether the last read found nothing from the client yet: if the deadline passes then,
    /// the client is the one that stalled.
    waiting_for_client: Rc<Cell<bool>>,
}

impl ClientBody {
    pub fn new(payload: Payload, limit: u64) -> (Self, Rc<Cell<bool>>) {
        let waiting_for_client = Rc::new(Cell::new(false));
        (Self { payload, remaining: limit, waiting_for_client: waiting_for_client.clone() }, waiting_for_client)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct BodyTooLarge;

/// The client's body broke off: it went away, or sent something that is not HTTP.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body broke off: {0}")]
pub struct ClientBodyBroken(String);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(bytes) => Poll::Ready(bytes.take().map(|bytes| Ok(Frame::data(bytes)))),
            RequestBody::Streamed(body) => {
                let polled = Pin::new(&mut body.payload).poll_next(cx);
                body.waiting_for_client.set(polled.is_pending());
                match polled {
                    Poll::Ready(Some(Ok(chunk))) => {
                        let size = chunk.len() as u64;
                        if size > body.remaining {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                        }
                        body.remaining -= size;
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    Poll::Ready(Some(Err(error))) => {
                        Poll::Ready(Some(Err(Box::new(ClientBodyBroken(error.to_string())))))
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Full(bytes) => bytes.is_none(),
            RequestBody::Streamed(_) => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            RequestBody::Empty | RequestBody::Full(None) => http_body::SizeHint::with_exact(0),
            RequestBody::Full(Some(bytes)) => http_body::SizeHint::with_exact(bytes.len() as u64),
            RequestBody::Streamed(_) => http_body::SizeHint::default(),
        }
    }
}

/// Why a request got no response.
pub enum SendFailure {
    /// Never written: no connection could be made, or a new one closed before the request
    /// was written. The request comes back, to go elsewhere.
    NotSent { cause: String, request: Box<Request<RequestBody>> },
    /// The client's body passed the limit while streaming.
    BodyTooLarge,
    /// The client's body broke off while streaming.
    ClientBodyBroken(String),
    /// Written (perhaps partly), then the connection failed before a response arrived: the
    /// upstream may or may not have acted on it.
    ConnectionLost(String),
}

type Sender = SendRequest<RequestBody>;

/// A connection waiting for its next request, since when.
struct Idle {
    sender: Sender,
    since: Instant,
}

/// One worker's connections, by endpoint address.
pub struct UpstreamClient {
    /// Oldest first: requests take the most recently used connection, so a burst's extra
    /// connections age out.
    idle: RefCell<HashMap<SocketAddr, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Rc<Self> {
        Rc::new(Self { idle: RefCell::new(HashMap::new()), connect_timeout, idle_timeout })
    }

    /// Sends `request` to `address` on an idle connection, or a new one. The response comes
    /// with its [`PooledConnection`]: release it once the body has been read to the end.
    pub async fn send(
        self: &Rc<Self>,
        address: SocketAddr,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, PooledConnection), SendFailure> {
        loop {
            let (mut sender, reused) = match self.idle_connection(address).await {
                Some(sender) => (sender, true),
                // Boxed: a new connection is rare, and its future would otherwise make
                // every request's future larger (it is moved into place on each request).
                None => match Box::pin(self.connect(address)).await {
                    Ok(sender) => (sender, false),
                    Err(cause) => return Err(SendFailure::NotSent { cause, request: Box::new(request) }),
                },
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok((response, PooledConnection { client: self.clone(), address, sender }));
                }
                Err(mut error) => match error.take_message() {
                    // An idle connection closed as it was picked up: try the next one.
                    Some(unsent) if reused => request = unsent,
                    Some(unsent) => {
                        let cause = format!("connection to {address} closed before the request was written");
                        return Err(SendFailure::NotSent { cause, request: Box::new(unsent) });
                    }
                    None => return Err(classify(error.into_error())),
                },
            }
        }
    }

    async fn idle_connection(&self, address: SocketAddr) -> Option<Sender> {
        loop {
            let mut sender = {
                let mut idle = self.idle.borrow_mut();
                let connections = idle.get_mut(&address)?;
                let Some(newest) = connections.pop() else {
                    idle.remove(&address);
                    return None;
                };
                if newest.since.elapsed() > self.idle_timeout {
                    // The upstream may be closing it right now; the rest are older still.
                    idle.remove(&address);
                    return None;
                }
                newest.sender
            };
            // Ready at once unless the upstream closed it while it was idle.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, address: SocketAddr) -> Result<Sender, String> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
            Err(_) => return Err(format!("connecting to {address} timed out")),
            Ok(Err(error)) => return Err(format!("connecting to {address}: {error}")),
            Ok(Ok(stream)) => stream,
        };
        // Requests are small and written whole: waiting to coalesce them only adds latency.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| format!("connecting to {address}: {error}"))?;
        actix_web::rt::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection closed");
            }
        });
        Ok(sender)
    }
}

/// Whose fault a failed exchange was: the client's body, or the connection.
fn classify(error: hyper::Error) -> SendFailure {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&error);
    while let Some(current) = cause {
        if current.is::<BodyTooLarge>() {
            return SendFailure::BodyTooLarge;
        }
        if let Some(broken) = current.downcast_ref::<ClientBodyBroken>() {
            return SendFailure::ClientBodyBroken(broken.0.clone());
        }
        cause = current.source();
    }
    SendFailure::ConnectionLost(error.to_string())
}

/// A connection in use by one request. Released after the response body was read to the
/// end, it serves the next request; dropped earlier, the connection closes.
pub struct PooledConnection {
    client: Rc<UpstreamClient>,
    address: SocketAddr,
    sender: Sender,
}

impl PooledConnection {
    pub fn release(self) {
        // Closed when the upstream answered `Connection: close` (a draining instance).
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.client.idle.borrow_mut();
        let connections = idle.entry(self.address).or_default();
        if connections.len() < MAX_IDLE_PER_ENDPOINT {
            connections.push(Idle { sender: self.sender, since: Instant::now() });
        }
    }
}

/// A response body passed on as it arrives; the connection is released at its end.
pub struct StreamedBody {
    body: Incoming,
    connection: Option<PooledConnection>,
}

impl StreamedBody {
    pub fn new(body: Incoming, connection: PooledConnection) -> Self {
        Self { body, connection: Some(connection) }
    }
}

impl Stream for StreamedBody {
    type Item = Result<Bytes, hyper::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    // Trailers: HTTP/1.1 responses to the client carry none.
                    Err(_) => continue,
                },
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    if let Some(connection) = self.connection.take() {
                        connection.release();
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
