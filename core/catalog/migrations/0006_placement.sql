-- osstream catalog, version 6: several servers on one catalog. What each server offers
-- new sessions (its HTTP address, its capacity, the client subnets it prefers, whether
-- it is being drained), the load it reports with its heartbeat, and the server each
-- session was placed on when it was opened. Portable SQL, as version 1.

-- The base URL of the server's HTTP listener (`http://HOST:PORT`), for the boot scripts
-- other servers hand to clients they place on it.
ALTER TABLE servers ADD COLUMN http_url TEXT;
-- Its share of new sessions relative to the others, in thousandths (1000 = 1.0).
ALTER TABLE servers ADD COLUMN capacity_milli BIGINT NOT NULL DEFAULT 1000;
-- Client subnets that prefer this server, comma-separated CIDRs ('' = none).
ALTER TABLE servers ADD COLUMN subnets TEXT NOT NULL DEFAULT '';
-- 1 while an administrator drains it: it keeps its sessions and gets no new ones.
ALTER TABLE servers ADD COLUMN draining BIGINT NOT NULL DEFAULT 0;
-- Bytes per second its clients read and wrote, as of its last heartbeat.
ALTER TABLE servers ADD COLUMN bytes_per_sec BIGINT NOT NULL DEFAULT 0;

-- The server a session was placed on when it was opened: its load until a server
-- holds the session (then the holder counts it).
ALTER TABLE sessions ADD COLUMN placed_on TEXT;
