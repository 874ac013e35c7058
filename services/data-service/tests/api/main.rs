//! One test binary for the data service: every module links into it once.

mod cache;
mod create;
mod helpers;
mod idempotency;
mod list;
mod operations;
mod read_write;
mod resilience;
