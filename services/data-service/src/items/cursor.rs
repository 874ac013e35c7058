//! The opaque pagination cursor: the `(created_at, id)` of the last item of a page, which
//! the next page continues strictly below. Ties in `created_at` are broken by `id`, so no
//! item repeats or goes missing across pages.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: OffsetDateTime,
    pub id: Uuid,
}

impl Cursor {
    /// `base64url("{unix microseconds}:{id}")`.
    pub fn encode(&self) -> String {
        let micros = self.created_at.unix_timestamp_nanos() / 1000;
        URL_SAFE_NO_PAD.encode(format!("{micros}:{}", self.id.as_hyphenated()))
    }

    pub fn decode(text: &str) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(text).ok()?;
        let raw = std::str::from_utf8(&raw).ok()?;
        let (micros, id) = raw.split_once(':')?;
        let micros: i128 = micros.parse().ok()?;
        let created_at = OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1000)?).ok()?;
        Some(Self { created_at, id: Uuid::try_parse(id).ok()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let cursor = Cursor {
            created_at: OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_000).unwrap(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        for bad in [
            "",
            "!!!",
            "bm9wZQ",
            &URL_SAFE_NO_PAD.encode("12:not-a-uuid"),
            &URL_SAFE_NO_PAD.encode("x:00000000-0000-0000-0000-000000000000"),
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
