-- osstream catalog, version 2: image identities, servers and the sessions they hold, why
-- sessions ended, private-lock epochs, and the chunk versions of fenced images.
-- Portable SQL, as version 1. Times named *_at are Unix milliseconds; heartbeat_at and
-- detached_at are written with the database's clock, so servers compare them with one clock.

-- Where a vdisk's bytes live (ImageBackend::identity), so one image is never registered
-- under two modes, whatever the backends are called.
ALTER TABLE vdisks ADD COLUMN image_id TEXT;
CREATE INDEX vdisks_image ON vdisks (image_id);

-- Every server sharing the catalog: `id` is kept in its data_dir across restarts,
-- `instance` is new for every start.
CREATE TABLE servers (
    id           TEXT PRIMARY KEY,
    instance     TEXT NOT NULL,
    name         TEXT NOT NULL,
    nbd_address  TEXT,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    stopped_at   BIGINT
);

-- The server (and instance) holding a session, whether it has connections now, since
-- when it has none, and why it ended.
ALTER TABLE sessions ADD COLUMN owner TEXT;
ALTER TABLE sessions ADD COLUMN owner_instance TEXT;
ALTER TABLE sessions ADD COLUMN attached BIGINT NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN detached_at BIGINT;
ALTER TABLE sessions ADD COLUMN end_reason TEXT;
-- The lock epoch a private session's current holding writes under.
ALTER TABLE sessions ADD COLUMN epoch BIGINT NOT NULL DEFAULT 0;
CREATE INDEX sessions_owner ON sessions (owner);

-- Grows each time a writer takes an image: every write is fenced by it.
CREATE TABLE image_epochs (
    image_id TEXT PRIMARY KEY,
    epoch    BIGINT NOT NULL
);

-- Which version of each chunk of a chunked S3 image is current, for images written by
-- private vdisks (data: the import the chunks belong to).
CREATE TABLE image_chunks (
    image_id TEXT NOT NULL,
    data     TEXT NOT NULL,
    chunk    BIGINT NOT NULL,
    version  TEXT NOT NULL,
    PRIMARY KEY (image_id, data, chunk)
);
