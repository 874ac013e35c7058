//! The items API (`/v1/items`).

pub mod cursor;
pub mod model;
pub mod preconditions;
pub mod repository;
pub mod routes;
