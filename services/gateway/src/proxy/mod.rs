//! The proxy, in phases as pingora-proxy's `ProxyHttp` runs them:
//!
//! 1. [`admission`]: authenticate, rate-limit, refuse what will not be forwarded;
//! 2. [`forward`]: prepare the request, choose an endpoint, send, retry when safe;
//! 3. [`respond`]: relay the answer, or the problem that explains its absence.
//!
//! Failures carry their source (the client, the upstream, the gateway: [`failure`]), and
//! one place maps them to statuses. [`headers`] builds what the upstream is told.

pub mod admission;
pub mod failure;
pub mod forward;
pub mod headers;
pub mod respond;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::{AppService, HttpServiceFactory, ResourceDef};
use actix_web::http::Method;
use actix_web::web::Payload;
use actix_web::{HttpRequest, HttpResponse, web};

use self::forward::{BodyLimits, Outgoing};
use crate::auth::Authenticator;
use crate::client::UpstreamClient;
use crate::configuration::RouteTarget;
use crate::ratelimit::RateLimiter;
use crate::upstream::Upstream;

/// A route with its upstream.
#[derive(Clone)]
pub struct Route {
    /// Without a trailing slash.
    pub prefix: String,
    pub upstream: Arc<Upstream>,
    /// Without a trailing slash.
    pub upstream_prefix: String,
    pub timeout: Duration,
}

impl Route {
    pub fn new(target: RouteTarget, upstreams: &[Arc<Upstream>]) -> Self {
        Self {
            prefix: target.prefix,
            upstream: upstreams[target.upstream].clone(),
            upstream_prefix: target.upstream_prefix,
            timeout: target.timeout,
        }
    }
}

/// What every proxied request shares, whatever its route.
pub struct Gateway {
    pub auth: Authenticator,
    pub limiter: RateLimiter,
    pub limits: BodyLimits,
    pub max_retries: u32,
}

/// Every path under the route's prefix (and the prefix itself), routed to [`proxy`] with the
/// route in hand.
///
/// A prefix resource matches by plain string comparison; the equivalent `{prefix}/{rest}*`
/// resource compiles to a regex, which cost about 8% of the gateway's CPU (routing plus the
/// metrics middleware's route lookup). Metrics and logs label these requests `prefix`.
/// Each worker has its own, so handing the route to a request costs no shared write.
pub struct PrefixRoute(pub Rc<Route>);

impl HttpServiceFactory for PrefixRoute {
    fn register(self, config: &mut AppService) {
        let route = self.0;
        let prefix = ResourceDef::prefix(route.prefix.clone());
        let handler = move |req: HttpRequest, payload: Payload| proxy(route.clone(), req, payload);
        config.register_service(prefix, None, web::to(handler), None);
    }
}

/// One proxied request, through the phases.
pub async fn proxy(route: Rc<Route>, req: HttpRequest, payload: Payload) -> HttpResponse {
    // Borrowed, not extracted: extracting clones an `Arc` every worker shares, a contended
    // write on every request.
    let (Some(gateway), Some(client)) =
        (req.app_data::<web::Data<Gateway>>(), req.app_data::<web::Data<Rc<UpstreamClient>>>())
    else {
        return HttpResponse::from_error(problem::Problem::internal());
    };
    let admitted = match admission::admit(gateway, &req).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let started = Instant::now();
    let deadline = started + route.timeout;
    // One timer for the whole exchange (reading the body, every attempt, backoff and the
    // buffered response): registered once, however often it is awaited.
    let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline.into()));
    let key_id = &*admitted.caller.key_id;
    let result = match Outgoing::prepare(&req, &route, key_id, payload, gateway.limits, timer.as_mut()).await {
        Ok(outgoing) => forward::forward(outgoing, client, gateway.max_retries, deadline, timer.as_mut()).await,
        Err(failure) => Err(failure),
    };
    let head_only = req.method() == Method::HEAD;
    respond::respond(result, head_only, &route, &admitted.decision, started, timer).await
}
