//! Entity tags: `ETag: "{version}"`, `If-Match` (strong comparison) and `If-None-Match`
//! (weak comparison), as RFC 9110 section 13 defines them.

use actix_web::http::header::{HeaderMap, HeaderName, IF_MATCH, IF_NONE_MATCH};

pub fn etag(version: i32) -> String {
    format!("\"{version}\"")
}

/// What `If-Match` allows.
#[derive(Debug, PartialEq, Eq)]
pub enum IfMatch {
    /// No header, or `*`: any current version.
    Any,
    /// Only these versions (empty when no tag could match, e.g. only weak tags).
    Versions(Vec<i32>),
}

impl IfMatch {
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let Some(value) = header_text(headers, IF_MATCH) else {
            return Self::Any;
        };
        let mut versions = Vec::new();
        for tag in value.split(',').map(str::trim) {
            if tag == "*" {
                return Self::Any;
            }
            // Weak tags never match under strong comparison.
            if let Some(version) = strong_version(tag) {
                versions.push(version);
            }
        }
        Self::Versions(versions)
    }

    /// For SQL: `NULL` means any version.
    pub fn as_sql(&self) -> Option<&[i32]> {
        match self {
            Self::Any => None,
            Self::Versions(versions) => Some(versions),
        }
    }

    pub fn allows(&self, version: i32) -> bool {
        match self {
            Self::Any => true,
            Self::Versions(versions) => versions.contains(&version),
        }
    }
}

/// Whether `If-None-Match` matches the current version (so the answer is 304).
pub fn if_none_match_hits(headers: &HeaderMap, version: i32) -> bool {
    header_text(headers, IF_NONE_MATCH).is_some_and(|value| {
        value
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || strong_version(tag.trim_start_matches("W/")) == Some(version))
    })
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn strong_version(tag: &str) -> Option<i32> {
    tag.strip_prefix('"')?.strip_suffix('"')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::HeaderValue;

    use super::*;

    fn headers(name: HeaderName, value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_str(value).unwrap());
        map
    }

    #[test]
    fn if_match_is_strong() {
        assert_eq!(IfMatch::from_headers(&HeaderMap::new()), IfMatch::Any);
        assert_eq!(IfMatch::from_headers(&headers(IF_MATCH, "*")), IfMatch::Any);
        assert_eq!(IfMatch::from_headers(&headers(IF_MATCH, "\"3\", \"5\"")), IfMatch::Versions(vec![3, 5]));
        assert_eq!(IfMatch::from_headers(&headers(IF_MATCH, "W/\"3\"")), IfMatch::Versions(vec![]));
        assert_eq!(IfMatch::from_headers(&headers(IF_MATCH, "3")), IfMatch::Versions(vec![]));
    }

    #[test]
    fn if_none_match_is_weak() {
        assert!(if_none_match_hits(&headers(IF_NONE_MATCH, "\"2\""), 2));
        assert!(if_none_match_hits(&headers(IF_NONE_MATCH, "W/\"2\""), 2));
        assert!(if_none_match_hits(&headers(IF_NONE_MATCH, "\"1\", \"2\""), 2));
        assert!(if_none_match_hits(&headers(IF_NONE_MATCH, "*"), 7));
        assert!(!if_none_match_hits(&headers(IF_NONE_MATCH, "\"1\""), 2));
        assert!(!if_none_match_hits(&HeaderMap::new(), 2));
    }
}
