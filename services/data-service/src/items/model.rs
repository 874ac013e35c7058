//! The item resource and the rules its request bodies must follow.
//!
//! Bodies are checked in two stages so clients learn what kind of mistake they made:
//! malformed JSON, a body that is not an object, or unknown fields -> 400; a known field
//! with the wrong type or an invalid value -> 422.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

pub const MAX_NAME_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 10_000;
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_CHARS: usize = 64;
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

const FIELDS: [&str; 4] = ["name", "description", "tags", "attributes"];

/// An item as the API returns it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Item {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub attributes: Value,
    /// Starts at 1, +1 on every change; the `ETag` is `"{version}"`.
    pub version: i32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// `POST /v1/items` body. No string may contain U+0000.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewItem {
    /// 1..=200 characters after trimming surrounding whitespace.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(default)]
    #[schema(max_length = 10000)]
    pub description: String,
    /// At most 32, each 1..=64 characters of `[a-z0-9-_.:]`; duplicates are dropped.
    #[serde(default)]
    #[schema(max_items = 32, inline, value_type = Vec<Tag>)]
    pub tags: Vec<String>,
    /// At most 16 KiB once serialized.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub attributes: Value,
}

/// `PATCH /v1/items/{id}` body: any subset of the fields; absent fields stay as they are.
/// `null` is rejected (422). No string may contain U+0000.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemPatch {
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, nullable = false)]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(max_length = 10000, nullable = false)]
    pub description: Option<String>,
    #[serde(default)]
    #[schema(max_items = 32, value_type = Vec<Tag>, nullable = false)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    #[schema(value_type = Object, nullable = false)]
    pub attributes: Option<Value>,
}

/// A tag: 1..=64 characters of `[a-z0-9-_.:]`.
#[derive(ToSchema)]
#[schema(as = Tag, min_length = 1, max_length = 64, pattern = r"^[a-z0-9\-_.:]{1,64}$")]
pub struct Tag(#[allow(dead_code)] String);

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// A rejected body: `Malformed` -> 400, `Invalid` -> 422.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    Malformed(String),
    Invalid(String),
}

/// Parses and validates a create body; the result is normalised (name trimmed, tags
/// deduplicated).
pub fn parse_new_item(body: &[u8]) -> Result<(NewItem, Value), BodyError> {
    let object = parse_object(body)?;
    let canonical = Value::Object(object.clone());
    let mut item: NewItem = serde_json::from_value(canonical.clone()).map_err(invalid_type)?;
    item.name = check_name(&item.name)?;
    check_description(&item.description)?;
    item.tags = check_tags(&item.tags)?;
    check_attributes(&item.attributes)?;
    Ok((item, canonical))
}

pub fn parse_patch(body: &[u8]) -> Result<ItemPatch, BodyError> {
    let object = parse_object(body)?;
    let mut patch: ItemPatch = serde_json::from_value(Value::Object(object)).map_err(invalid_type)?;
    if let Some(name) = &patch.name {
        patch.name = Some(check_name(name)?);
    }
    if let Some(description) = &patch.description {
        check_description(description)?;
    }
    if let Some(tags) = &patch.tags {
        patch.tags = Some(check_tags(tags)?);
    }
    if let Some(attributes) = &patch.attributes {
        check_attributes(attributes)?;
    }
    Ok(patch)
}

/// JSON syntax, an object at the top, only known fields, no nulls.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, BodyError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| BodyError::Malformed(format!("malformed JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(BodyError::Malformed("the body must be a JSON object".to_owned()));
    };
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(BodyError::Malformed(format!("unknown field `{unknown}`; the fields are {}", FIELDS.join(", "))));
    }
    if let Some((field, _)) = object.iter().find(|(_, v)| v.is_null()) {
        return Err(BodyError::Invalid(format!("{field}: must not be null")));
    }
    Ok(object)
}

fn invalid_type(error: serde_json::Error) -> BodyError {
    BodyError::Invalid(error.to_string())
}

/// Postgres stores neither a NUL in text nor `\u0000` in jsonb.
fn check_no_nul(field: &str, text: &str) -> Result<(), BodyError> {
    if text.contains('\0') {
        Err(BodyError::Invalid(format!("{field}: must not contain NUL (U+0000)")))
    } else {
        Ok(())
    }
}

fn value_contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(values) => values.iter().any(value_contains_nul),
        Value::Object(object) => object.iter().any(|(key, value)| key.contains('\0') || value_contains_nul(value)),
        _ => false,
    }
}

pub fn check_name(name: &str) -> Result<String, BodyError> {
    check_no_nul("name", name)?;
    let trimmed = name.trim();
    let chars = trimmed.chars().count();
    if (1..=MAX_NAME_CHARS).contains(&chars) {
        Ok(trimmed.to_owned())
    } else {
        Err(BodyError::Invalid(format!("name: must be 1..={MAX_NAME_CHARS} characters after trimming, got {chars}")))
    }
}

fn check_description(description: &str) -> Result<(), BodyError> {
    check_no_nul("description", description)?;
    let chars = description.chars().count();
    if chars <= MAX_DESCRIPTION_CHARS {
        Ok(())
    } else {
        Err(BodyError::Invalid(format!("description: must be at most {MAX_DESCRIPTION_CHARS} characters, got {chars}")))
    }
}

pub fn is_valid_tag(tag: &str) -> bool {
    (1..=MAX_TAG_CHARS).contains(&tag.len())
        && tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Deduplicated in first-seen order.
fn check_tags(tags: &[String]) -> Result<Vec<String>, BodyError> {
    if tags.len() > MAX_TAGS {
        return Err(BodyError::Invalid(format!("tags: at most {MAX_TAGS} entries, got {}", tags.len())));
    }
    let mut unique: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        if !is_valid_tag(tag) {
            return Err(BodyError::Invalid(format!(
                "tags: {tag:?} is not 1..={MAX_TAG_CHARS} characters of [a-z0-9-_.:]"
            )));
        }
        if !unique.contains(tag) {
            unique.push(tag.clone());
        }
    }
    Ok(unique)
}

fn check_attributes(attributes: &Value) -> Result<(), BodyError> {
    if !attributes.is_object() {
        return Err(BodyError::Invalid("attributes: must be a JSON object".to_owned()));
    }
    if value_contains_nul(attributes) {
        return Err(BodyError::Invalid("attributes: must not contain NUL (U+0000) in keys or strings".to_owned()));
    }
    let size = serde_json::to_vec(attributes).map_or(usize::MAX, |v| v.len());
    if size > MAX_ATTRIBUTES_BYTES {
        return Err(BodyError::Invalid(format!(
            "attributes: must be at most {MAX_ATTRIBUTES_BYTES} bytes serialized, got {size}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(body: &str) -> Result<NewItem, BodyError> {
        parse_new_item(body.as_bytes()).map(|(item, _)| item)
    }

    fn is_malformed(result: Result<NewItem, BodyError>) -> bool {
        matches!(result, Err(BodyError::Malformed(_)))
    }

    fn is_invalid(result: Result<NewItem, BodyError>) -> bool {
        matches!(result, Err(BodyError::Invalid(_)))
    }

    #[test]
    fn defaults_and_normalisation() {
        let item = create(r#"{"name":"  widget  ","tags":["a","b","a"]}"#).unwrap();
        assert_eq!(item.name, "widget");
        assert_eq!(item.description, "");
        assert_eq!(item.tags, ["a", "b"]);
        assert_eq!(item.attributes, serde_json::json!({}));
    }

    #[test]
    fn structural_mistakes_are_400() {
        assert!(is_malformed(create("{")));
        assert!(is_malformed(create("[]")));
        assert!(is_malformed(create(r#""name""#)));
        assert!(is_malformed(create(r#"{"name":"x","colour":"red"}"#)));
    }

    #[test]
    fn field_mistakes_are_422() {
        assert!(is_invalid(create("{}")), "name is required");
        assert!(is_invalid(create(r#"{"name":5}"#)));
        assert!(is_invalid(create(r#"{"name":null}"#)));
        assert!(is_invalid(create(r#"{"name":"   "}"#)));
        assert!(is_invalid(create(&format!(r#"{{"name":"{}"}}"#, "é".repeat(201)))));
        assert!(create(&format!(r#"{{"name":"{}"}}"#, "é".repeat(200))).is_ok(), "characters, not bytes");
        assert!(is_invalid(create(&format!(r#"{{"name":"x","description":"{}"}}"#, "d".repeat(10_001)))));
        assert!(is_invalid(create(r#"{"name":"x","tags":["UPPER"]}"#)));
        assert!(is_invalid(create(r#"{"name":"x","tags":[""]}"#)));
        assert!(is_invalid(create(&format!(r#"{{"name":"x","tags":["{}"]}}"#, "t".repeat(65)))));
        let many: Vec<String> = (0..33).map(|i| format!("\"t{i}\"")).collect();
        assert!(is_invalid(create(&format!(r#"{{"name":"x","tags":[{}]}}"#, many.join(",")))));
        assert!(is_invalid(create(r#"{"name":"x","attributes":[1]}"#)));
        assert!(is_invalid(create(r#"{"name":"a\u0000b"}"#)));
        assert!(is_invalid(create(r#"{"name":"x","description":"\u0000"}"#)));
        assert!(is_invalid(create(r#"{"name":"x","attributes":{"k":["\u0000"]}}"#)));
        assert!(is_invalid(create(r#"{"name":"x","attributes":{"\u0000":1}}"#)));
        let big = format!(r#"{{"name":"x","attributes":{{"k":"{}"}}}}"#, "v".repeat(MAX_ATTRIBUTES_BYTES));
        assert!(is_invalid(create(&big)));
    }

    #[test]
    fn patches_accept_any_subset_but_no_nulls() {
        let patch = parse_patch(b"{}").unwrap();
        assert!(patch.name.is_none() && patch.tags.is_none());
        assert_eq!(parse_patch(br#"{"name":" n "}"#).unwrap().name.as_deref(), Some("n"));
        assert!(matches!(parse_patch(br#"{"tags":null}"#), Err(BodyError::Invalid(_))));
        assert!(matches!(parse_patch(br#"{"id":"x"}"#), Err(BodyError::Malformed(_))));
    }
}
