//! Every SQL statement of the items API. Each write is one statement or one transaction, so
//! a crash leaves all of a change or none of it.

use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::cursor::Cursor;
use super::model::{Item, ItemPatch, NewItem};
use crate::db::{DbError, QueryTimer};

/// An item's columns, in [`item_from_row`]'s order. Macros, so that every statement is one
/// string made at compile time rather than formatted on each query.
macro_rules! columns {
    () => {
        "id, name, description, tags, attributes, version, created_at, updated_at"
    };
}

macro_rules! select_items {
    ($($rest:literal),+) => {
        concat!("SELECT ", columns!(), " ", $($rest),+)
    };
}

const SELECT_BY_ID: &str = select_items!("FROM items WHERE id = $1");

/// The statement for a page with or without a tag and a cursor: one per combination rather
/// than one with `$n IS NULL OR ...`, whose cached generic plan turns the cursor into a
/// filter, so that every page would walk the index from the newest row. A tag's items are
/// read from `item_tags`, whose key is in list order. Parameters: the limit, then the tag,
/// then the cursor's two halves.
fn list_statement(tag: bool, cursor: bool) -> &'static str {
    match (tag, cursor) {
        (false, false) => select_items!("FROM items ORDER BY created_at DESC, id DESC LIMIT $1"),
        (false, true) => {
            select_items!("FROM items WHERE (created_at, id) < ($2, $3) ORDER BY created_at DESC, id DESC LIMIT $1")
        }
        (true, false) => select_items!(
            "FROM item_tags JOIN items ON id = item_id WHERE tag = $2 ",
            "ORDER BY item_created_at DESC, item_id DESC LIMIT $1"
        ),
        (true, true) => select_items!(
            "FROM item_tags JOIN items ON id = item_id WHERE tag = $2 AND (item_created_at, item_id) < ($3, $4) ",
            "ORDER BY item_created_at DESC, item_id DESC LIMIT $1"
        ),
    }
}

/// Decodes a row; a value that cannot be decoded is an error, never a panic.
fn item_from_row(row: &Row) -> Result<Item, DbError> {
    Ok(Item {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        description: row.try_get(2)?,
        tags: row.try_get(3)?,
        attributes: row.try_get(4)?,
        version: row.try_get(5)?,
        created_at: row.try_get(6)?,
        updated_at: row.try_get(7)?,
    })
}

/// The outcome of a conditional write.
pub enum Written<T> {
    Done(T),
    NotFound,
    /// `If-Match` named other versions; carries the current one.
    VersionMismatch(i32),
}

/// A keyed create: its first response, to be replayed.
pub struct StoredResponse {
    pub request_hash: Vec<u8>,
    pub item_id: Uuid,
    pub item_version: i32,
    pub body: String,
}

pub enum KeyedCreate {
    Created(Item),
    /// The key was used before: here is what it produced.
    Replay(StoredResponse),
    /// Another request with this key is being processed right now.
    InFlight,
}

#[derive(Clone)]
pub struct Repository {
    pool: Pool,
}

impl Repository {
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    pub async fn get(&self, id: Uuid) -> Result<Option<Item>, DbError> {
        let _timer = QueryTimer::start("get_item");
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(SELECT_BY_ID).await?;
        client.query_opt(&statement, &[&id]).await?.as_ref().map(item_from_row).transpose()
    }

    /// Newest first, strictly after `cursor`; fetches one extra row to know whether another
    /// page follows.
    pub async fn list(&self, limit: i64, cursor: Option<Cursor>, tag: Option<&str>) -> Result<Vec<Item>, DbError> {
        let _timer = QueryTimer::start("list_items");
        let client = self.pool.get().await?;
        let limit = limit + 1;
        let mut parameters: Vec<&(dyn ToSql + Sync)> = vec![&limit];
        if let Some(tag) = &tag {
            parameters.push(tag);
        }
        if let Some(cursor) = &cursor {
            parameters.push(&cursor.created_at);
            parameters.push(&cursor.id);
        }
        let statement = client.prepare_cached(list_statement(tag.is_some(), cursor.is_some())).await?;
        let rows = client.query(&statement, &parameters).await?;
        rows.iter().map(item_from_row).collect()
    }

    pub async fn create(&self, item: &NewItem) -> Result<Item, DbError> {
        let _timer = QueryTimer::start("create_item");
        let client = self.pool.get().await?;
        insert(&client, item).await
    }

    /// Creates the item and stores its response under `key`, in one transaction. Concurrent
    /// requests with the same key serialise on a transaction-scoped advisory lock taken
    /// without waiting: the loser learns at once that the key is in flight.
    pub async fn create_keyed(
        &self,
        key: &str,
        request_hash: &[u8],
        item: &NewItem,
        ttl_secs: u64,
        render: impl FnOnce(&Item) -> String,
    ) -> Result<KeyedCreate, DbError> {
        let _timer = QueryTimer::start("create_item_idempotent");
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        let locked: bool = transaction
            .query_one("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", &[&key])
            .await?
            .try_get(0)?;
        // The early outcomes end the transaction explicitly: a dropped transaction's ROLLBACK
        // is only queued, so the lock could outlive the response and turn the client's next
        // request with this key into a spurious "in flight".
        if !locked {
            transaction.rollback().await?;
            return Ok(KeyedCreate::InFlight);
        }
        let previous = transaction
            .query_opt(
                "SELECT request_hash, item_id, item_version, response_body FROM idempotency_keys \
                 WHERE key = $1 AND expires_at > now()",
                &[&key],
            )
            .await?;
        if let Some(row) = previous {
            let stored = StoredResponse {
                request_hash: row.try_get(0)?,
                item_id: row.try_get(1)?,
                item_version: row.try_get(2)?,
                body: row.try_get(3)?,
            };
            transaction.rollback().await?;
            return Ok(KeyedCreate::Replay(stored));
        }
        let created = insert(&transaction, item).await?;
        let ttl_secs = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
        transaction
            .execute(
                "INSERT INTO idempotency_keys (key, request_hash, item_id, item_version, response_body, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6)) \
                 ON CONFLICT (key) DO UPDATE SET request_hash = EXCLUDED.request_hash, item_id = EXCLUDED.item_id, \
                   item_version = EXCLUDED.item_version, response_body = EXCLUDED.response_body, \
                   created_at = now(), expires_at = EXCLUDED.expires_at",
                &[&key, &request_hash, &created.id, &created.version, &render(&created), &(ttl_secs as f64)],
            )
            .await?;
        transaction.commit().await?;
        Ok(KeyedCreate::Created(created))
    }

    /// Applies a patch when `allowed` admits the current version (`None`: any). A patch
    /// that changes nothing leaves the version as it is.
    pub async fn patch(&self, id: Uuid, patch: &ItemPatch, allowed: Option<&[i32]>) -> Result<Written<Item>, DbError> {
        let _timer = QueryTimer::start("patch_item");
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(concat!(
                "UPDATE items SET name = COALESCE($2, name), description = COALESCE($3, description), \
                   tags = COALESCE($4, tags), attributes = COALESCE($5, attributes), \
                   version = version + 1, updated_at = now() \
                 WHERE id = $1 AND ($6::int4[] IS NULL OR version = ANY($6)) \
                   AND (name, description, tags, attributes) IS DISTINCT FROM \
                       (COALESCE($2, name), COALESCE($3, description), COALESCE($4, tags), COALESCE($5, attributes)) \
                 RETURNING ",
                columns!()
            ))
            .await?;
        let attributes: Option<&Value> = patch.attributes.as_ref();
        let updated = client
            .query_opt(&statement, &[&id, &patch.name, &patch.description, &patch.tags, &attributes, &allowed])
            .await?;
        if let Some(row) = updated {
            return Ok(Written::Done(item_from_row(&row)?));
        }
        // Not changed: the item is missing, the precondition failed, or there was nothing
        // to change.
        let statement = client.prepare_cached(SELECT_BY_ID).await?;
        Ok(match client.query_opt(&statement, &[&id]).await? {
            None => Written::NotFound,
            Some(row) => {
                let current = item_from_row(&row)?;
                if allowed.is_none_or(|versions| versions.contains(&current.version)) {
                    Written::Done(current)
                } else {
                    Written::VersionMismatch(current.version)
                }
            }
        })
    }

    /// Deletes when `allowed` admits the current version; returns the deleted version.
    pub async fn delete(&self, id: Uuid, allowed: Option<&[i32]>) -> Result<Written<i32>, DbError> {
        let _timer = QueryTimer::start("delete_item");
        let client = self.pool.get().await?;
        let statement = client
            .prepare_cached(
                "DELETE FROM items WHERE id = $1 AND ($2::int4[] IS NULL OR version = ANY($2)) RETURNING version",
            )
            .await?;
        if let Some(row) = client.query_opt(&statement, &[&id, &allowed]).await? {
            return Ok(Written::Done(row.try_get(0)?));
        }
        let statement = client.prepare_cached("SELECT version FROM items WHERE id = $1").await?;
        Ok(match client.query_opt(&statement, &[&id]).await? {
            None => Written::NotFound,
            Some(row) => Written::VersionMismatch(row.try_get(0)?),
        })
    }

    /// Deletes expired idempotency records; returns how many.
    pub async fn purge_expired_keys(&self) -> Result<u64, DbError> {
        let _timer = QueryTimer::start("purge_idempotency_keys");
        let client = self.pool.get().await?;
        Ok(client.execute("DELETE FROM idempotency_keys WHERE expires_at <= now()", &[]).await?)
    }
}

async fn insert(client: &impl GenericClient, item: &NewItem) -> Result<Item, DbError> {
    let statement = client
        .prepare_cached(concat!(
            "INSERT INTO items (id, name, description, tags, attributes) VALUES ($1, $2, $3, $4, $5) RETURNING ",
            columns!()
        ))
        .await?;
    let row = client
        .query_one(&statement, &[&Uuid::now_v7(), &item.name, &item.description, &item.tags, &item.attributes])
        .await?;
    item_from_row(&row)
}
