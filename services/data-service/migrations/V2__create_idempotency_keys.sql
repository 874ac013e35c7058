-- The first response of each keyed POST, written in the same transaction as the item it
-- created, so a crash leaves both or neither.
CREATE TABLE idempotency_keys (
    key           text        PRIMARY KEY CHECK (char_length(key) BETWEEN 1 AND 255),
    request_hash  bytea       NOT NULL,
    item_id       uuid        NOT NULL,
    item_version  integer     NOT NULL,
    response_body text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);

CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);
