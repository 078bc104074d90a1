-- osstream catalog, version 1. Portable SQL: the same text runs on SQLite and PostgreSQL.
-- Times are Unix milliseconds (BIGINT); flags are 0/1 (BIGINT).

CREATE TABLE vdisks (
    name        TEXT PRIMARY KEY,
    backend     TEXT NOT NULL,
    image_key   TEXT NOT NULL,
    size        BIGINT NOT NULL,
    mode        TEXT NOT NULL,
    write_cache TEXT NOT NULL,
    boot        TEXT NOT NULL,
    kernel      TEXT,
    initrd      TEXT,
    cmdline     TEXT,
    description TEXT NOT NULL,
    enabled     BIGINT NOT NULL,
    locked_by   TEXT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE clients (
    mac         TEXT PRIMARY KEY,
    name        TEXT UNIQUE,
    hostname    TEXT UNIQUE,
    client_group TEXT,
    notes       TEXT NOT NULL,
    first_seen  BIGINT,
    last_seen   BIGINT,
    created_at  BIGINT NOT NULL
);

CREATE TABLE assignments (
    mac        TEXT NOT NULL REFERENCES clients (mac) ON DELETE CASCADE,
    vdisk      TEXT NOT NULL REFERENCES vdisks (name) ON DELETE CASCADE,
    position   BIGINT NOT NULL,
    is_default BIGINT NOT NULL,
    PRIMARY KEY (mac, vdisk)
);

CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    token         TEXT NOT NULL UNIQUE,
    mac           TEXT NOT NULL,
    vdisk         TEXT NOT NULL,
    peer          TEXT,
    started_at    BIGINT NOT NULL,
    last_active   BIGINT NOT NULL,
    bytes_read    BIGINT NOT NULL,
    bytes_written BIGINT NOT NULL,
    closed_at     BIGINT
);

CREATE INDEX sessions_live ON sessions (mac, closed_at);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
