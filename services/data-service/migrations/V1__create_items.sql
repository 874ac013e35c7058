CREATE TABLE items (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    description text        NOT NULL DEFAULT '' CHECK (char_length(description) <= 10000),
    tags        text[]      NOT NULL DEFAULT '{}' CHECK (cardinality(tags) <= 32),
    attributes  jsonb       NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(attributes) = 'object'),
    version     integer     NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Keyset pagination, newest first: ORDER BY created_at DESC, id DESC.
CREATE INDEX items_created_at_id_idx ON items (created_at DESC, id DESC);
-- ?tag= filter: tags @> ARRAY[$tag].
CREATE INDEX items_tags_idx ON items USING gin (tags);
