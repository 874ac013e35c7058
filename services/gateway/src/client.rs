//! The upstream client: HTTP/1.1 keep-alive connections, pooled per worker thread.
//!
//! Built on hyper's connection API rather than a general-purpose client: a connection keeps
//! its buffers and its task for as long as it lives, so a request costs one message to that
//! task. (awc built a new codec, with its own clock-refresh task, for every request: about
//! a tenth of the gateway's CPU.) A pool belongs to one worker thread and is never shared.

use std::cell::RefCell;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
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
    /// The client's body, passed on as it arrives and failed once more than `remaining`
    /// bytes have come, so an oversized body is refused without being held in memory.
    Streamed {
        payload: Payload,
        remaining: u64,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the limit")]
pub struct BodyTooLarge;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let RequestBody::Streamed { payload, remaining } = self.get_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(payload).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let size = chunk.len() as u64;
                if size > *remaining {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                }
                *remaining -= size;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Box::new(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, RequestBody::Empty)
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the upstream never saw the request.
    Connect(String),
    /// The client's body passed the limit while streaming.
    BodyTooLarge,
    /// The connection failed after the request was (perhaps partly) sent.
    Failed(String),
}

type Sender = SendRequest<RequestBody>;

/// A connection waiting for its next request, since when.
struct Idle {
    sender: Sender,
    since: Instant,
}

/// One worker's connections, by endpoint address (`host:port`).
pub struct UpstreamClient {
    /// Oldest first: requests take the most recently used connection, so a burst's extra
    /// connections age out.
    idle: RefCell<HashMap<Arc<str>, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Rc<Self> {
        Rc::new(Self { idle: RefCell::new(HashMap::new()), connect_timeout, idle_timeout })
    }

    /// Sends `request` to `address` on an idle connection, or a new one. The response comes
    /// with the connection's [`Lease`]: release it once the body has been read to the end.
    pub async fn send(
        self: &Rc<Self>,
        address: &Arc<str>,
        mut request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), SendError> {
        loop {
            let (mut sender, reused) = match self.idle_connection(address).await {
                Some(sender) => (sender, true),
                // Boxed: a new connection is rare, and its future would otherwise make
                // every request's future larger (it is moved into place on each request).
                None => (Box::pin(self.connect(address)).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let lease = Lease { client: self.clone(), address: address.clone(), sender };
                    return Ok((response, lease));
                }
                Err(mut error) => match error.take_message() {
                    // Not written at all: an idle connection closed as it was picked up. Any
                    // request may go again, on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(classify(error.into_error())),
                },
            }
        }
    }

    async fn idle_connection(&self, address: &str) -> Option<Sender> {
        loop {
            let mut sender = {
                let mut idle = self.idle.borrow_mut();
                let connections = idle.get_mut(address)?;
                let newest = connections.pop()?;
                if newest.since.elapsed() > self.idle_timeout {
                    // The upstream may be closing it right now; the rest are older still.
                    connections.clear();
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

    async fn connect(&self, address: &str) -> Result<Sender, SendError> {
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
            Err(_) => return Err(SendError::Connect(format!("connecting to {address} timed out"))),
            Ok(Err(error)) => return Err(SendError::Connect(format!("connecting to {address}: {error}"))),
            Ok(Ok(stream)) => stream,
        };
        // Requests are small and written whole: waiting to coalesce them only adds latency.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Connect(format!("connecting to {address}: {error}")))?;
        actix_web::rt::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection closed");
            }
        });
        Ok(sender)
    }
}

fn classify(error: hyper::Error) -> SendError {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&error);
    let mut too_large = false;
    while let Some(current) = cause {
        too_large |= current.is::<BodyTooLarge>();
        cause = current.source();
    }
    if too_large { SendError::BodyTooLarge } else { SendError::Failed(error.to_string()) }
}

/// A connection in use by one request. Released after the response body was read to the
/// end, it serves the next request; dropped earlier, the connection closes.
pub struct Lease {
    client: Rc<UpstreamClient>,
    address: Arc<str>,
    sender: Sender,
}

impl Lease {
    pub fn release(self) {
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
    lease: Option<Lease>,
}

impl StreamedBody {
    pub fn new(body: Incoming, lease: Lease) -> Self {
        Self { body, lease: Some(lease) }
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
                    if let Some(lease) = self.lease.take() {
                        lease.release();
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
