//! Every way an items request can fail, mapped to its HTTP problem in one place.

use problem::Problem;
use uuid::Uuid;

use crate::db::DbError;
use crate::items::model::BodyError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("item {0} not found")]
    NotFound(Uuid),
    #[error("If-Match does not match the current version \"{0}\"")]
    VersionMismatch(i32),
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    IdempotencyKeyInFlight,
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::Malformed(detail) => Self::BadRequest(detail),
            BodyError::Invalid(detail) => Self::Unprocessable(detail),
        }
    }
}

impl From<ApiError> for Problem {
    fn from(error: ApiError) -> Self {
        let detail = error.to_string();
        match error {
            ApiError::BadRequest(_) => Problem::bad_request(detail),
            ApiError::Unprocessable(_) | ApiError::IdempotencyKeyReused => Problem::unprocessable(detail),
            ApiError::UnsupportedMediaType(_) => Problem::unsupported_media_type(detail),
            ApiError::NotFound(_) => Problem::not_found(detail),
            ApiError::VersionMismatch(_) => Problem::precondition_failed(detail),
            ApiError::IdempotencyKeyInFlight => {
                Problem::conflict(detail).with_header(actix_web::http::header::RETRY_AFTER, "1")
            }
            // The cause goes to the log, inside the request's span (so with its id); the
            // client learns only what it can act on.
            ApiError::Database(DbError::Unavailable(cause)) => {
                tracing::warn!(%cause, "database unavailable");
                Problem::unavailable("the database is unavailable; retry shortly", 1)
            }
            ApiError::Database(DbError::Failed(cause)) => {
                tracing::error!(%cause, "database error");
                Problem::internal()
            }
        }
    }
}
