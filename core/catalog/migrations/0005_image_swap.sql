-- osstream catalog, version 5: images replaced under running clients. A session keeps the
-- image it started on (`image_key`; NULL in sessions older than this version means the
-- vdisk's image). `vdisk import --replace` uploads the new image under a new key and
-- retires the old one here; it is deleted from its backend once no live session reads it.
ALTER TABLE sessions ADD COLUMN image_key TEXT;

CREATE TABLE retired_images (
    backend    TEXT NOT NULL,
    image_key  TEXT NOT NULL,
    vdisk      TEXT NOT NULL,
    retired_at BIGINT NOT NULL,
    PRIMARY KEY (backend, image_key)
);
