//! One test binary for the gateway.

mod auth;
mod helpers;
mod proxying;
mod rate_limits;
mod resilience;
