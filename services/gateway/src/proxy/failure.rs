//! Why a proxied request got no answer from its upstream, whose fault that was, and what the
//! client is told, in one place. The split follows pingora-error's `ErrorSource`: the
//! client's fault (downstream), the upstream's, or the gateway's own (internal).

use actix_web::http::StatusCode;
use problem::Problem;

use crate::upstream::RetryReason;

/// Whose fault a failure was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client's: its body.
    Downstream,
    /// The upstream's: unreachable, lost, slow, or shedding.
    Upstream,
    /// The gateway's own.
    Internal,
}

#[derive(Debug)]
pub enum Failure {
    /// The body passed `proxy.body_limit_bytes` (413).
    BodyTooLarge {
        limit: u64,
    },
    /// The client stopped sending its body and the deadline passed (408).
    BodyIncomplete,
    /// The client's body broke off: it hung up or sent broken chunks (400).
    BodyBroken(String),
    /// The breaker is open: every endpoint has been failing (503).
    Shed {
        retry_after_secs: u64,
    },
    /// The upstream has no endpoints (its host name has resolved to none yet) (503).
    NoEndpoint,
    /// The request never left the gateway: no connection could be made (503).
    NotSent(String),
    /// The connection failed after the request was written, before any answer (502).
    ConnectionLost(String),
    /// No answer by the route's deadline (504).
    TimedOut,
    /// The upstream's response body broke off while it was read (502).
    ResponseBroken(String),
    Internal(String),
}

impl Failure {
    pub fn source(&self) -> ErrorSource {
        match self {
            Failure::BodyTooLarge { .. } | Failure::BodyIncomplete | Failure::BodyBroken(_) => ErrorSource::Downstream,
            Failure::Shed { .. }
            | Failure::NoEndpoint
            | Failure::NotSent(_)
            | Failure::ConnectionLost(_)
            | Failure::TimedOut
            | Failure::ResponseBroken(_) => ErrorSource::Upstream,
            Failure::Internal(_) => ErrorSource::Internal,
        }
    }

    /// Why this failure may be retried on another attempt, if it may. A request that never
    /// left the gateway may always go again; one that was lost on the way only when it is
    /// safe to repeat (`repeatable`: an idempotent method or a keyed POST, with a body the
    /// gateway still holds).
    pub fn retry_reason(&self, repeatable: bool) -> Option<RetryReason> {
        match self {
            Failure::NotSent(_) => Some(RetryReason::NotSent),
            Failure::ConnectionLost(_) if repeatable => Some(RetryReason::ConnectionLost),
            _ => None,
        }
    }

    /// Whether the upstream as a whole was out of reach (what the breaker counts).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Failure::NoEndpoint | Failure::NotSent(_) | Failure::ConnectionLost(_) | Failure::TimedOut)
    }

    /// The `status` label of `gateway_upstream_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Failure::BodyTooLarge { .. } => "body_too_large",
            Failure::BodyIncomplete => "client_timeout",
            Failure::BodyBroken(_) => "client_error",
            Failure::Shed { .. } => "shed",
            Failure::NoEndpoint => "no_endpoint",
            Failure::NotSent(_) => "connect_error",
            Failure::ConnectionLost(_) => "connection_lost",
            Failure::TimedOut => "timeout",
            Failure::ResponseBroken(_) => "response_broken",
            Failure::Internal(_) => "error",
        }
    }

    /// What the client is told. Causes (addresses, errors) are for the log, not the client.
    pub fn problem(&self, upstream: &str) -> Problem {
        match self {
            Failure::BodyTooLarge { limit } => body_too_large(*limit),
            Failure::BodyIncomplete => {
                Problem::new(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")
            }
            Failure::BodyBroken(_) => Problem::bad_request("the request body broke off"),
            Failure::Shed { retry_after_secs } => {
                Problem::unavailable(format!("upstream {upstream} is unavailable (circuit open)"), *retry_after_secs)
            }
            Failure::NoEndpoint => Problem::unavailable(format!("upstream {upstream} has no endpoints yet"), 1),
            Failure::NotSent(_) => Problem::unavailable(format!("upstream {upstream} is unreachable"), 1),
            Failure::ConnectionLost(_) | Failure::ResponseBroken(_) => {
                Problem::new(StatusCode::BAD_GATEWAY, format!("upstream {upstream} failed to answer"))
            }
            Failure::TimedOut => {
                Problem::new(StatusCode::GATEWAY_TIMEOUT, format!("upstream {upstream} did not answer in time"))
            }
            Failure::Internal(_) => Problem::internal(),
        }
    }

    /// The cause, for the log line.
    pub fn cause(&self) -> Option<&str> {
        match self {
            Failure::BodyBroken(cause)
            | Failure::NotSent(cause)
            | Failure::ConnectionLost(cause)
            | Failure::ResponseBroken(cause)
            | Failure::Internal(cause) => Some(cause),
            _ => None,
        }
    }
}

/// The 413 for a body over `limit`, whether it declared its length or was cut off while it
/// streamed.
pub fn body_too_large(limit: u64) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request bodies are limited to {limit} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unsent_requests_or_those_safe_to_repeat_are_retried() {
        let unsent = Failure::NotSent("refused".into());
        assert_eq!(unsent.retry_reason(false), Some(RetryReason::NotSent));
        let lost = Failure::ConnectionLost("reset".into());
        assert_eq!(lost.retry_reason(false), None, "a POST without a key may have been acted on");
        assert_eq!(lost.retry_reason(true), Some(RetryReason::ConnectionLost));
        for never in [Failure::TimedOut, Failure::BodyIncomplete, Failure::BodyTooLarge { limit: 1 }] {
            assert_eq!(never.retry_reason(true), None, "{never:?}");
        }
    }

    #[test]
    fn each_failure_has_its_source_and_status() {
        let cases = [
            (Failure::BodyTooLarge { limit: 1 }, ErrorSource::Downstream, 413),
            (Failure::BodyIncomplete, ErrorSource::Downstream, 408),
            (Failure::BodyBroken("eof".into()), ErrorSource::Downstream, 400),
            (Failure::Shed { retry_after_secs: 2 }, ErrorSource::Upstream, 503),
            (Failure::NoEndpoint, ErrorSource::Upstream, 503),
            (Failure::NotSent("refused".into()), ErrorSource::Upstream, 503),
            (Failure::ConnectionLost("reset".into()), ErrorSource::Upstream, 502),
            (Failure::TimedOut, ErrorSource::Upstream, 504),
            (Failure::ResponseBroken("eof".into()), ErrorSource::Upstream, 502),
            (Failure::Internal("bug".into()), ErrorSource::Internal, 500),
        ];
        for (failure, source, status) in cases {
            assert_eq!(failure.source(), source, "{failure:?}");
            let problem = failure.problem("data-service");
            assert_eq!(problem.status().as_u16(), status, "{failure:?}");
            if let Some(cause) = failure.cause() {
                assert!(!problem.detail().contains(cause), "causes stay in the log: {failure:?}");
            }
        }
    }
}
