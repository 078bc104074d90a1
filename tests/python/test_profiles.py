"""Boot profiles end to end: a boot over NBD is recorded, the next boot after a restart
gets its blocks prefetched into the cold cache, a changed image's profile is not used,
and the `profile` commands show, export, import and clear profiles."""

import json
import re
import shutil
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, random_image

MIB = 1 << 20
BLOCK = 64 * 1024
# A "boot": scattered blocks, read once each, in this order.
BOOT = [100, 3, 4, 5, 200, 7, 50, 8, 9, 300]


def wait_log(server, text, timeout=20, count=1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.log.read_text().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{server.log.read_text()}")


@pytest.fixture
def lab(make_server):
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\n'
                    '[profile]\nquiet = "500ms"\nmin_bytes = "64KiB"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    random_image(s.images / "deb.img", 32 * MIB, seed=5)
    random_image(s.images / "other.img", 32 * MIB, seed=6)
    s.start()

    def cli(*args, ok=True):
        out = subprocess.run([BINARY, "--config", str(s.config), *args], capture_output=True, text=True, timeout=60)
        assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out

    cli("vdisk", "add", "deb", "--backend", "images")
    cli("vdisk", "add", "other", "--backend", "images")
    cli("client", "add", "aa:bb:cc:00:00:01")
    cli("client", "assign", "aa:bb:cc:00:00:01", "deb")
    s.cli = cli
    return s


def boot(lab, blocks=BOOT):
    """Opens a session and reads `blocks` as a booting client would; returns the handle."""
    uri = lab.cli("session", "open", "aa:bb:cc:00:00:01", "deb").stdout.strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    image = (lab.images / "deb.img").read_bytes()
    for block in blocks:
        offset = block * BLOCK + 1024
        assert h.pread(4096, offset) == image[offset:offset + 4096]
    return h


def stop_stats(lab):
    """Stops the server; returns its cache and profile statistics lines as dicts."""
    lab.stop()
    log = lab.log.read_text()
    def fields(marker):
        line = next(l for l in log.splitlines() if marker in l)
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    return fields("cache statistics"), fields("boot profile statistics")


def show(lab, *extra):
    return json.loads(lab.cli("--json", "profile", "show", "deb", *extra).stdout)


def test_a_recorded_boot_is_streamed_into_the_cold_cache_of_a_restarted_server(lab):
    h = boot(lab)
    wait_log(lab, "boot profile recorded")
    h.shutdown()
    shown = show(lab, "--blocks")
    assert shown["boots"] == 1 and shown["current"] is True, shown
    assert shown["boot_set"] == BOOT
    assert shown["boot_set_bytes"] == len(BOOT) * BLOCK
    assert "boot set:    640KiB in 10 blocks" in lab.cli("profile", "show", "deb").stdout

    # Restarted: the RAM cache is empty, the profile is in the catalog.
    lab.stop()
    lab.start()
    h = boot(lab, blocks=[])
    wait_log(lab, "boot set prefetch done")
    image = (lab.images / "deb.img").read_bytes()
    for block in BOOT:
        offset = block * BLOCK + 1024
        assert h.pread(4096, offset) == image[offset:offset + 4096]
    h.shutdown()
    cache, profile = stop_stats(lab)
    # Every block the boot read was prefetched: its reads were all hits.
    assert cache["misses"] == len(BOOT), cache
    assert cache["hits"] >= len(BOOT), cache
    assert profile["prefetches"] == 1 and profile["prefetch_bytes"] == len(BOOT) * BLOCK, profile
    # 3,4,5 and 7,8,9 are neighbours: 6 reads for 10 blocks.
    assert cache["backend_reads"] == 6, cache


def test_a_changed_image_gets_a_new_profile_and_the_old_one_is_never_used(lab):
    h = boot(lab)
    wait_log(lab, "boot profile recorded")
    h.shutdown()
    # The image is replaced behind osstream's back: a new generation.
    shutil.copy(lab.images / "other.img", lab.images / "deb.img")
    assert show(lab)["current"] is False
    assert "not usable: recorded from another image or an older version" in lab.cli("profile", "show", "deb").stdout
    h = boot(lab, blocks=[1, 2])
    wait_log(lab, "of another image generation: not used")
    wait_log(lab, "boot profile recorded", count=2)
    h.shutdown()
    shown = show(lab, "--blocks")
    assert (shown["boots"], shown["boot_set"], shown["current"]) == (1, [1, 2], True), shown
    _, profile = stop_stats(lab)
    assert profile["stale_profiles"] == 1 and profile["prefetches"] == 0, profile


def test_profile_commands_export_import_and_clear_with_clear_errors(lab, tmp_path):
    out = lab.cli("profile", "show", "deb", ok=False)
    assert "vdisk \"deb\" has no boot profile yet" in out.stderr, out.stderr
    assert "vdisk \"nope\" does not exist" in lab.cli("profile", "show", "nope", ok=False).stderr
    h = boot(lab)
    wait_log(lab, "boot profile recorded")
    h.shutdown()

    exported = tmp_path / "deb.profile.json"
    lab.cli("profile", "export", "deb", "--output", str(exported))
    data = json.loads(exported.read_text())
    assert data["vdisk"] == "deb" and data["boots"] == 1
    assert json.loads(lab.cli("profile", "export", "deb").stdout) == data

    # Into another vdisk: stored, but it describes another image, so it is not used.
    out = lab.cli("profile", "import", "other", str(exported))
    assert "imported a boot profile of 1 boot(s)" in out.stdout
    assert "will not be used" in out.stderr
    assert json.loads(lab.cli("--json", "profile", "show", "other").stdout)["current"] is False

    # Clear, then import it back from stdin.
    assert "cleared the boot profile of vdisk deb" in lab.cli("profile", "clear", "deb").stdout
    assert "had no boot profile" in lab.cli("profile", "clear", "deb").stdout
    out = subprocess.run([BINARY, "--config", str(lab.config), "profile", "import", "deb", "-"],
                         input=exported.read_text(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert show(lab, "--blocks")["boot_set"] == BOOT

    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"format": 1, "vdisk": "deb"}')
    err = lab.cli("profile", "import", "deb", str(garbage), ok=False).stderr
    assert "not a boot profile" in err, err
    data["format"] = 7
    garbage.write_text(json.dumps(data))
    assert "format 7 is not one this release reads" in lab.cli("profile", "import", "deb", str(garbage), ok=False).stderr
    assert "cannot read" in lab.cli("profile", "import", "deb", str(tmp_path / "missing"), ok=False).stderr
