-- osstream catalog, version 7: placement counts each server's live sessions (held there,
-- or placed there and not yet attached) at every boot; this index serves that count
-- however long the history of ended sessions grows. Portable SQL, as version 1
-- (SQLite and PostgreSQL both index an expression under a WHERE).
CREATE INDEX sessions_on_server ON sessions (COALESCE(owner, placed_on)) WHERE closed_at IS NULL;

-- 1 when the server has the shared overlay folder (`[sessions] shared_overlay_dir`):
-- only such servers are given sessions of `shared-disk` vdisks.
ALTER TABLE servers ADD COLUMN shared_overlays BIGINT NOT NULL DEFAULT 0;
-- Its `[sessions] server_timeout` in milliseconds (0: not recorded), which every server
-- of one catalog must share: a server warns at start about one that differs.
ALTER TABLE servers ADD COLUMN server_timeout_ms BIGINT NOT NULL DEFAULT 0;
