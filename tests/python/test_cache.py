"""Cache tiers end to end: RAM in front of the server-disk tier, which keeps its blocks
across a restart and never serves a damaged one; eviction policies by config; and
`osstream cache stats`."""

import json
import subprocess

import pytest

from conftest import BINARY, random_image, sha256

MIB = 1 << 20


def stats(server):
    return {layer["layer"]: dict(layer["counters"])
            for layer in json.loads(server.cli("--json", "cache", "stats"))["layers"]}


def copy_out(server, export, out):
    subprocess.run(["nbdcopy", server.uri(export), str(out)], check=True, timeout=120)
    return sha256(out)


@pytest.mark.parametrize("policy", ["clock", "lru", "s3fifo"])
def test_ram_and_disk_tiers_serve_exact_bytes_and_the_disk_tier_survives_a_restart(make_server, tmp_path, policy):
    s = make_server('[cache]\ntiers = ["ram", "disk"]\n'
                    f'[cache.ram]\ncapacity = "4MiB"\npolicy = "{policy}"\n'
                    '[cache.disk]\ncapacity = "64MiB"\n', start=False)
    random_image(s.images / "base.img", 24 * MIB, seed=11)
    want = sha256(s.images / "base.img")
    s.start()
    assert copy_out(s, "base", tmp_path / "one.raw") == want
    s.stop()
    first = json.loads(s.cli("--json", "cache", "stats"))
    assert first["running"] is False
    layers = {l["layer"]: dict(l["counters"]) for l in first["layers"]}
    assert layers["cache:disk"]["backend_bytes"] == 24 * MIB, layers
    assert layers["cache:ram"]["evictions"] > 0, layers

    # Restarted: RAM is empty, the disk tier still holds every block.
    s.start()
    assert copy_out(s, "base", tmp_path / "two.raw") == want
    s.stop()
    layers = stats(s)
    assert layers["cache:disk"]["backend_bytes"] == 0, layers
    assert layers["cache:disk"]["hits"] == 24 * MIB // (64 * 1024), layers
    assert f"policy=\"{policy}\"" in s.log.read_text() or f"policy={policy}" in s.log.read_text()
    table = s.cli("cache", "stats")
    assert "TIER" in table and "disk" in table and "100.0%" in table, table


def test_a_damaged_disk_cache_block_is_read_again_from_the_backend(make_server, tmp_path):
    s = make_server('[cache]\ntiers = ["disk"]\n[cache.disk]\ncapacity = "32MiB"\n', start=False)
    random_image(s.images / "base.img", 8 * MIB, seed=12)
    want = sha256(s.images / "base.img")
    s.start()
    assert copy_out(s, "base", tmp_path / "one.raw") == want
    s.stop()
    with open(s.data_dir / "cache" / "blocks.dat", "r+b") as f:
        for offset in (1000, 3 * MIB + 5):
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
    s.start()
    assert copy_out(s, "base", tmp_path / "two.raw") == want
    s.stop()
    assert s.log.read_text().count("failed its checksum") == 2
    assert stats(s)["cache:disk"]["misses"] == 2


def test_cache_config_mistakes_and_a_missing_stats_file_are_explained(make_server):
    s = make_server(start=False)
    out = subprocess.run([BINARY, "--config", str(s.config), "cache", "stats"], capture_output=True, text=True)
    assert out.returncode == 2 and "no server has run on this data_dir yet" in out.stderr, out.stderr
    for extra, words in (
        ('[cache.ram]\npolicy = "arc"\n', "policy: unknown variant: found `arc`, expected `one of `clock`, `lru`, `s3fifo`"),
        ('[cache]\ntiers = ["ram", "disk"]\n[cache.disk]\nlow_watermark = 99\n', "low_watermark = 99 must be below"),
        ('[cache]\ntiers = ["disk"]\n[cache.disk]\ncapacity = "100KiB"\n', "holds fewer than 16 blocks"),
        ('[profile]\ndepth = 0\n', "[profile] depth = 0 must be from 1 to 64"),
    ):
        s.config.write_text(s.config.read_text().split("\n[cache")[0].split("\n[profile")[0] + "\n" + extra)
        out = subprocess.run([BINARY, "--config", str(s.config), "serve"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and words in out.stderr, (extra, out.stderr)
