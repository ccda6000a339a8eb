-- The table PgStore keeps its entries in, with the default names (schema "public", table
-- "idempotency_keys"): the statements PgStore::migrate runs, for your own migration tool.
-- Keep it in step with PgStore::ddl (a test compares them).

CREATE SCHEMA IF NOT EXISTS "public";

CREATE TABLE IF NOT EXISTS "public"."idempotency_keys" (
    key text PRIMARY KEY,
    owner bytea NOT NULL,
    fingerprint bytea NOT NULL,
    record bytea,
    expires_at timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS "idempotency_keys_expires_at" ON "public"."idempotency_keys" (expires_at);
