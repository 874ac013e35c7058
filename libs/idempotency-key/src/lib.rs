//! The `Idempotency-Key` request header of the items API (see the data service's OpenAPI
//! document): 1 to 255 printable ASCII characters. The data service stores keys by it; the
//! gateway refuses a key that breaks it with the same 400 problem, before scoping the key
//! to the client, so a key is judged by what the client sent.

/// The header's name, lowercase as HTTP/1.1 header maps hold it.
pub const HEADER: &str = "idempotency-key";

/// The longest key, in characters (bytes: keys are ASCII).
pub const MAX_LENGTH: usize = 255;

/// The rule, as the `detail` of the 400 problem that refuses a key.
pub const RULE: &str = "Idempotency-Key must be 1..=255 printable ASCII characters";

/// The regular expression of the rule, for the OpenAPI document.
pub const PATTERN: &str = "^[\\x20-\\x7e]{1,255}$";

/// A header value that breaks [`RULE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidKey;

impl std::fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(RULE)
    }
}

impl std::error::Error for InvalidKey {}

/// The key in `value` (a header value's bytes), if it keeps [`RULE`].
pub fn parse(value: &[u8]) -> Result<&str, InvalidKey> {
    if !(1..=MAX_LENGTH).contains(&value.len()) || !value.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(InvalidKey);
    }
    // Printable ASCII is UTF-8.
    std::str::from_utf8(value).map_err(|_| InvalidKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_ascii_up_to_255_characters_is_a_key() {
        assert_eq!(parse(b"order-17"), Ok("order-17"));
        assert_eq!(parse(b" ~"), Ok(" ~"));
        let longest = "k".repeat(MAX_LENGTH);
        assert_eq!(parse(longest.as_bytes()), Ok(longest.as_str()));
    }

    #[test]
    fn empty_long_control_and_non_ascii_keys_are_refused() {
        let too_long = "k".repeat(MAX_LENGTH + 1);
        for bad in [&b""[..], too_long.as_bytes(), b"tab\there", b"del\x7f", "caf\u{e9}".as_bytes(), b"\x00"] {
            assert_eq!(parse(bad), Err(InvalidKey), "{bad:?}");
        }
        assert_eq!(InvalidKey.to_string(), RULE);
    }
}
