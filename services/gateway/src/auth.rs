//! API keys: `Authorization: Bearer <key>`, checked against configured SHA-256 hashes in
//! constant time. Only the key id ever reaches logs and metric labels.

use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use problem::Problem;
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::configuration::AuthSettings;

/// One client's key, as configured.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    pub rate_per_sec: u32,
    pub burst: u32,
}

/// Who is calling: the configured key that authenticated a request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub key_id: Arc<str>,
    pub rate_per_sec: u32,
    pub burst: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read auth.keys_file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("auth keys are not a valid JSON list of {{id, sha256, rate_per_sec, burst}}: {0}")]
    Json(#[from] serde_json::Error),
    #[error("auth key {0:?}: sha256 must be 64 hex characters")]
    Hash(String),
    #[error("auth key {0:?}: rate_per_sec and burst must be at least 1")]
    Rate(String),
}

pub struct Authenticator {
    keys: Vec<(Caller, [u8; 32])>,
}

impl Authenticator {
    pub fn from_settings(settings: &AuthSettings) -> Result<Self, KeysError> {
        let text = if settings.keys_file.is_empty() {
            settings.keys.expose_secret().to_owned()
        } else {
            std::fs::read_to_string(&settings.keys_file)
                .map_err(|source| KeysError::File { path: settings.keys_file.clone(), source })?
        };
        let configured: Vec<ApiKey> = serde_json::from_str(&text)?;
        let keys = configured
            .into_iter()
            .map(|key| {
                let hash = decode_hex(&key.sha256).ok_or_else(|| KeysError::Hash(key.id.clone()))?;
                if key.rate_per_sec == 0 || key.burst == 0 {
                    return Err(KeysError::Rate(key.id));
                }
                let caller = Caller { key_id: Arc::from(key.id), rate_per_sec: key.rate_per_sec, burst: key.burst };
                Ok((caller, hash))
            })
            .collect::<Result<_, _>>()?;
        // Every reason's counter exists from the start, at zero.
        for reason in ["missing", "malformed", "unknown"] {
            metrics::counter!("gateway_auth_failures_total", "reason" => reason).increment(0);
        }
        Ok(Self { keys })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Every configured caller.
    pub fn callers(&self) -> impl Iterator<Item = &Caller> {
        self.keys.iter().map(|(caller, _)| caller)
    }

    /// The caller behind the request's bearer key, or the 401 to answer.
    pub fn authenticate(&self, req: &HttpRequest) -> Result<&Caller, Problem> {
        let Some(header) = req.headers().get(AUTHORIZATION) else {
            return Err(unauthorized("missing"));
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return Err(unauthorized("malformed"));
        };
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every key, without stopping early, in constant time each.
        let mut found = None;
        for (caller, hash) in &self.keys {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found.ok_or_else(|| unauthorized("unknown"))
    }
}

fn unauthorized(reason: &'static str) -> Problem {
    metrics::counter!("gateway_auth_failures_total", "reason" => reason).increment(1);
    Problem::new(actix_web::http::StatusCode::UNAUTHORIZED, "a valid API key is required: Authorization: Bearer <key>")
        .with_header(WWW_AUTHENTICATE, "Bearer")
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;
    use secrecy::SecretString;

    use super::*;

    fn authenticator() -> Authenticator {
        // SHA-256 of "secret-one".
        let hash = format!("{:x}", Sha256::digest(b"secret-one"));
        let keys = format!(r#"[{{"id":"one","sha256":"{hash}","rate_per_sec":5,"burst":10}}]"#);
        Authenticator::from_settings(&AuthSettings { keys: SecretString::from(keys), keys_file: String::new() })
            .unwrap()
    }

    #[test]
    fn accepts_the_configured_key_only() {
        let auth = authenticator();
        let ok = TestRequest::default().insert_header((AUTHORIZATION, "Bearer secret-one")).to_http_request();
        assert_eq!(&*auth.authenticate(&ok).unwrap().key_id, "one");
        for header in ["Bearer secret-two", "Basic c2VjcmV0LW9uZQ==", "Bearer ", "secret-one"] {
            let req = TestRequest::default().insert_header((AUTHORIZATION, header)).to_http_request();
            assert_eq!(auth.authenticate(&req).unwrap_err().status(), 401, "{header}");
        }
        assert!(auth.authenticate(&TestRequest::default().to_http_request()).is_err());
    }

    #[test]
    fn bad_key_configuration_is_named() {
        let bad = AuthSettings {
            keys: SecretString::from(r#"[{"id":"x","sha256":"zz","rate_per_sec":1,"burst":1}]"#),
            keys_file: String::new(),
        };
        assert!(Authenticator::from_settings(&bad).err().unwrap().to_string().contains("\"x\""));
    }
}
