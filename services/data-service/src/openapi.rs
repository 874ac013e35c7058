//! The OpenAPI 3.1 document, generated from the handlers' annotations.

use actix_web::{HttpResponse, web};
use observability::server::get_or_head;
use problem::ProblemDocument;
use utoipa::OpenApi;

use crate::items::model::{Item, ItemPatch, NewItem, Tag};
use crate::items::routes::{self, ItemPage};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stackline data service",
        description = "The items API. Every error is application/problem+json (RFC 9457) carrying the request id; \
                       every response carries X-Request-ID."
    ),
    paths(routes::create_item, routes::list_items, routes::get_item, routes::patch_item, routes::delete_item),
    components(schemas(Item, NewItem, ItemPatch, ItemPage, Tag, ProblemDocument)),
    tags((name = "items", description = "Items: create, read, list, change and delete."))
)]
pub struct ApiDoc;

/// Registers `GET /openapi.json`, rendered once.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let document = ApiDoc::openapi().to_json().unwrap_or_default();
    cfg.route(
        "/openapi.json",
        get_or_head().to(move || {
            let document = document.clone();
            async move { HttpResponse::Ok().content_type("application/json").body(document) }
        }),
    );
}
