-- osstream catalog, version 4: boot profiles. One merged profile per vdisk, of one image
-- generation (a changed image starts a new one). `profile` is the engine's JSON
-- (`BootProfile::to_json`); `revision` moves with every write, so two servers merging a
-- boot at once retry instead of losing one. Times are Unix milliseconds.
CREATE TABLE boot_profiles (
    vdisk      TEXT PRIMARY KEY REFERENCES vdisks (name) ON DELETE CASCADE,
    image      TEXT NOT NULL,
    generation TEXT NOT NULL,
    boots      BIGINT NOT NULL,
    revision   BIGINT NOT NULL,
    profile    TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
