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
-- private vdisks. `data` names the import the chunks belong to (unique per import, the
-- same for every server that reads the image); image_id says which image, for people.
CREATE TABLE image_chunks (
    data     TEXT NOT NULL,
    chunk    BIGINT NOT NULL,
    version  TEXT NOT NULL,
    image_id TEXT NOT NULL,
    PRIMARY KEY (data, chunk)
);

-- Sessions live when this version is installed were held by a server process of the
-- previous version, which kept no record of it: those a client used (it has a peer)
-- count as disconnected since their last activity, so they end after the grace period
-- unless the client comes back; those with a RAM overlay lost it with that process.
UPDATE sessions SET detached_at = last_active WHERE closed_at IS NULL AND peer IS NOT NULL;
UPDATE sessions SET closed_at = last_active,
    end_reason = 'osstream was upgraded and the session''s RAM write overlay went with the old server process; the client must boot again'
    WHERE closed_at IS NULL AND peer IS NOT NULL
    AND vdisk IN (SELECT name FROM vdisks WHERE mode = 'standard' AND write_cache IN ('ram', 'ram-overflow-disk'));
UPDATE vdisks SET locked_by = NULL WHERE locked_by IS NOT NULL
    AND locked_by NOT IN (SELECT id FROM sessions WHERE closed_at IS NULL);
