//! One test binary for the gateway.

mod auth;
mod endpoints;
mod helpers;
mod proxying;
mod rate_limits;
mod resilience;
