//! The `/v1/items` handlers and their OpenAPI descriptions.

use actix_web::http::header::{self, ContentType};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use observability::server::get_or_head;
use problem::{Problem, ProblemDocument};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use super::cursor::Cursor;
use super::model::{Item, ItemPatch, NewItem, is_valid_tag, parse_new_item, parse_patch};
use super::preconditions::{IfMatch, etag, if_none_match_hits};
use super::repository::{KeyedCreate, Repository, Written};
use crate::cache::{Cache, Lookup};
use crate::error::ApiError;

pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
const DEFAULT_LIMIT: i64 = 20;
const MAX_LIMIT: i64 = 100;

pub struct ItemsState {
    pub repository: Repository,
    pub cache: Cache,
    pub idempotency_ttl_secs: u64,
}

type Result<T> = std::result::Result<T, Problem>;

/// A page of items, newest first.
#[derive(Serialize, ToSchema)]
pub struct ItemPage {
    pub items: Vec<Item>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// 1..=100, default 20.
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only items carrying this tag.
    #[param(pattern = r"^[a-z0-9\-_.:]{1,64}$")]
    tag: Option<String>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/items")
            .route(web::post().to(create_item))
            .route(get_or_head().to(list_items))
            .default_service(web::to(|| async { Problem::method_not_allowed(&["GET", "HEAD", "POST"]) })),
    )
    .service(
        web::resource("/v1/items/{id}")
            .route(get_or_head().to(get_item))
            .route(web::patch().to(patch_item))
            .route(web::delete().to(delete_item))
            .default_service(web::to(|| async { Problem::method_not_allowed(&["GET", "HEAD", "PATCH", "DELETE"]) })),
    );
}

/// Only the canonical 36-character form, so each item has one URL and one cache entry.
fn parse_id(raw: &str) -> std::result::Result<Uuid, ApiError> {
    Uuid::try_parse(raw)
        .ok()
        .filter(|_| raw.len() == 36)
        .ok_or_else(|| ApiError::BadRequest(format!("id must be a UUID, got {raw:?}")))
}

fn require_json(req: &HttpRequest, accepted: &[&str]) -> std::result::Result<(), ApiError> {
    let essence = req.mime_type().ok().flatten().map(|mime| mime.essence_str().to_owned());
    match essence {
        Some(essence) if accepted.contains(&essence.as_str()) => Ok(()),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be {}, got {}",
            accepted.join(" or "),
            other.as_deref().unwrap_or("none")
        ))),
    }
}

fn to_json(item: &Item) -> Vec<u8> {
    serde_json::to_vec(item).unwrap_or_default()
}

fn item_response(status: actix_web::http::StatusCode, item_version: i32, body: Vec<u8>) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header(ContentType::json())
        .insert_header((header::ETAG, etag(item_version)))
        .body(body)
}

fn created(id: Uuid, version: i32, body: Vec<u8>, replayed: bool) -> HttpResponse {
    let mut response = item_response(actix_web::http::StatusCode::CREATED, version, body);
    let headers = response.headers_mut();
    if let Ok(location) = format!("/v1/items/{id}").parse() {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert(header::HeaderName::from_static(IDEMPOTENT_REPLAYED), header::HeaderValue::from_static("true"));
    }
    response
}

/// JSON with object keys sorted at every level: equal JSON values, equal bytes.
fn canonical_json(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(object) => {
            let mut entries: Vec<_> = object.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(key).unwrap_or_default());
                out.push(b':');
                canonical_json(value, out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(values) => {
            out.push(b'[');
            for (i, value) in values.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(value, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

fn idempotency_key(req: &HttpRequest) -> std::result::Result<Option<&str>, ApiError> {
    let Some(value) = req.headers().get(idempotency_key::HEADER) else {
        return Ok(None);
    };
    idempotency_key::parse(value.as_bytes()).map(Some).map_err(|invalid| ApiError::BadRequest(invalid.to_string()))
}

/// Create an item.
#[utoipa::path(
    post, path = "/v1/items", tag = "items",
    request_body(content = NewItem, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[\\x20-\\x7e]{1,255}$", description = "Makes retries safe: a repeat with the same key and body returns the first response again (for 24 h).")),
    responses(
        (status = 201, description = "Created.", body = Item, headers(
            ("Location" = String, description = "`/v1/items/{id}`"),
            ("ETag" = String, description = "`\"{version}\"`"),
            ("Idempotent-Replayed" = String, description = "`true` when this is the stored response of an earlier request with the same key"))),
        (status = 400, description = "Malformed JSON, not an object, an unknown field, or a bad Idempotency-Key.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "A request with this Idempotency-Key is still in flight.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid, or the Idempotency-Key was used with another body.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn create_item(state: web::Data<ItemsState>, req: HttpRequest, body: web::Bytes) -> Result<HttpResponse> {
    require_json(&req, &["application/json"])?;
    let key = idempotency_key(&req)?;
    let (item, submitted) = parse_new_item(&body).map_err(ApiError::from)?;
    let Some(key) = key else {
        let created_item = state.repository.create(&item).await.map_err(ApiError::from)?;
        return Ok(created(created_item.id, created_item.version, to_json(&created_item), false));
    };
    let mut canonical = Vec::with_capacity(body.len());
    canonical_json(&submitted, &mut canonical);
    let request_hash = Sha256::digest(&canonical).to_vec();
    let outcome = state
        .repository
        .create_keyed(key, &request_hash, &item, state.idempotency_ttl_secs, |item: &Item| {
            serde_json::to_string(item).unwrap_or_default()
        })
        .await
        .map_err(ApiError::from)?;
    Ok(match outcome {
        KeyedCreate::Created(item) => created(item.id, item.version, to_json(&item), false),
        KeyedCreate::InFlight => return Err(ApiError::IdempotencyKeyInFlight.into()),
        KeyedCreate::Replay(stored) if stored.request_hash != request_hash => {
            return Err(ApiError::IdempotencyKeyReused.into());
        }
        KeyedCreate::Replay(stored) => {
            metrics::counter!("idempotent_replays_total").increment(1);
            created(stored.item_id, stored.item_version, stored.body.into_bytes(), true)
        }
    })
}

/// List items, newest first.
#[utoipa::path(
    get, path = "/v1/items", tag = "items",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of items.", body = ItemPage),
        (status = 400, description = "Bad limit, cursor or tag.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn list_items(state: web::Data<ItemsState>, query: web::Query<ListQuery>) -> Result<HttpResponse> {
    let limit = match &query.limit {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| ApiError::BadRequest(format!("limit must be an integer in 1..={MAX_LIMIT}")))?,
    };
    let cursor = match &query.cursor {
        None => None,
        Some(text) => Some(Cursor::decode(text).ok_or_else(|| ApiError::BadRequest("invalid cursor".to_owned()))?),
    };
    let tag = query.tag.as_deref();
    if let Some(tag) = tag
        && !is_valid_tag(tag)
    {
        return Err(ApiError::BadRequest("tag must be 1..=64 characters of [a-z0-9-_.:]".to_owned()).into());
    }
    let mut items = state.repository.list(limit, cursor, tag).await.map_err(ApiError::from)?;
    let next_cursor = if items.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
        items.truncate(items.len() - 1);
        items.last().map(|last| Cursor { created_at: last.created_at, id: last.id }.encode())
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(ItemPage { items, next_cursor }))
}

/// Get one item.
#[utoipa::path(
    get, path = "/v1/items/{id}", tag = "items",
    params(
        ("id" = Uuid, Path, description = "The item's id."),
        ("If-None-Match" = Option<String>, Header, description = "ETags the client has; 304 when one is current."),
    ),
    responses(
        (status = 200, description = "The item.", body = Item, headers(("ETag" = String, description = "`\"{version}\"`"))),
        (status = 304, description = "The client's copy is current.", headers(("ETag" = String))),
        (status = 400, description = "The id is not a UUID.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such item.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn get_item(state: web::Data<ItemsState>, req: HttpRequest, path: web::Path<String>) -> Result<HttpResponse> {
    let id = parse_id(&path)?;
    let (version, body) = match state.cache.get(id).await {
        Lookup::Item { version, body } => (version, body),
        Lookup::Deleted => return Err(ApiError::NotFound(id).into()),
        Lookup::Unknown => {
            let item = state.repository.get(id).await.map_err(ApiError::from)?.ok_or(ApiError::NotFound(id))?;
            let body = to_json(&item);
            let cache = state.cache.clone();
            let cached = body.clone();
            actix_web::rt::spawn(async move { cache.fill(id, item.version, cached).await });
            (item.version, body)
        }
    };
    if if_none_match_hits(req.headers(), version) {
        return Ok(HttpResponse::NotModified().insert_header((header::ETAG, etag(version))).finish());
    }
    Ok(item_response(actix_web::http::StatusCode::OK, version, body))
}

/// Change some fields of an item.
#[utoipa::path(
    patch, path = "/v1/items/{id}", tag = "items",
    request_body(content = ItemPatch, content_type = "application/json"),
    params(
        ("id" = Uuid, Path, description = "The item's id."),
        ("If-Match" = Option<String>, Header, description = "Apply only if the item's ETag is one of these (strong comparison)."),
    ),
    responses(
        (status = 200, description = "The item after the change (unchanged, same version, when nothing differed).", body = Item, headers(("ETag" = String))),
        (status = 400, description = "Bad id, malformed JSON, not an object, or an unknown field.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such item.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 412, description = "If-Match does not match the current version.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 413, description = "Body over the size limit.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 415, description = "Content-Type is not application/json or application/merge-patch+json.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn patch_item(
    state: web::Data<ItemsState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let id = parse_id(&path)?;
    require_json(&req, &["application/json", "application/merge-patch+json"])?;
    let patch: ItemPatch = parse_patch(&body).map_err(ApiError::from)?;
    let if_match = IfMatch::from_headers(req.headers());
    match state.repository.patch(id, &patch, if_match.as_sql()).await.map_err(ApiError::from)? {
        Written::Done(item) => {
            let body = to_json(&item);
            // Before answering: a read that starts after this response must see the change.
            state.cache.record_write(id, item.version, Some(body.clone())).await;
            Ok(item_response(actix_web::http::StatusCode::OK, item.version, body))
        }
        Written::NotFound => Err(ApiError::NotFound(id).into()),
        Written::VersionMismatch(current) => Err(ApiError::VersionMismatch(current).into()),
    }
}

/// Delete an item.
#[utoipa::path(
    delete, path = "/v1/items/{id}", tag = "items",
    params(
        ("id" = Uuid, Path, description = "The item's id."),
        ("If-Match" = Option<String>, Header, description = "Delete only if the item's ETag is one of these (strong comparison)."),
    ),
    responses(
        (status = 204, description = "Deleted."),
        (status = 400, description = "The id is not a UUID.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such item.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 412, description = "If-Match does not match the current version.", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable.", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn delete_item(
    state: web::Data<ItemsState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_id(&path)?;
    let if_match = IfMatch::from_headers(req.headers());
    match state.repository.delete(id, if_match.as_sql()).await.map_err(ApiError::from)? {
        Written::Done(version) => {
            state.cache.record_write(id, version, None).await;
            Ok(HttpResponse::NoContent().finish())
        }
        Written::NotFound => Err(ApiError::NotFound(id).into()),
        Written::VersionMismatch(current) => Err(ApiError::VersionMismatch(current).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace() {
        let a: serde_json::Value = serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"q":2,"p":1}],"x":null}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "a": {"x": null, "y": [1, {"p":1,"q":2}]}, "b": 1 }"#).unwrap();
        let (mut ca, mut cb) = (Vec::new(), Vec::new());
        canonical_json(&a, &mut ca);
        canonical_json(&b, &mut cb);
        assert_eq!(ca, cb);
        assert_eq!(String::from_utf8(ca).unwrap(), r#"{"a":{"x":null,"y":[1,{"p":1,"q":2}]},"b":1}"#);
    }
}
