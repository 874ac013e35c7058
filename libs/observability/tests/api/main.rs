//! One test binary: every module links into it once.

mod health;
mod helpers;
mod http;
mod metrics;
mod process;
