"""Replacing a vdisk's image under running clients: sessions keep the image they started
on, byte for byte; new sessions get the new one; the old image is deleted when its last
session ends. An image changed in place behind osstream's back fails its readers rather
than mixing old and new bytes."""

import json
import shutil
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, random_image

MIB = 1 << 20


@pytest.fixture
def lab(make_server, tmp_path):
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\n'
                    '[sessions]\nreconcile_interval = "200ms"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    s.start()

    def cli(*args, ok=True):
        out = subprocess.run([BINARY, "--config", str(s.config), *args], capture_output=True, text=True, timeout=120)
        assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out

    s.cli = cli
    for n, seed in ((1, 1), (2, 2), (3, 3)):
        random_image(tmp_path / f"os{n}.raw", 16 * MIB, seed=seed)
    cli("vdisk", "import", str(tmp_path / "os1.raw"), "os", "--backend", "images", "--quiet")
    for mac in ("aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02", "aa:bb:cc:00:00:03"):
        cli("client", "add", mac)
        cli("client", "assign", mac, "os")
    return s


def attach(lab, mac):
    h = nbd.NBD()
    h.connect_uri(lab.cli("session", "open", mac, "os").stdout.strip())
    return h


def read_all(h, step=MIB):
    return b"".join(h.pread(step, offset) for offset in range(0, h.get_size(), step))


def session_of(lab, mac):
    sessions = json.loads(lab.cli("--json", "session", "list").stdout)
    return next(s["id"] for s in sessions if s["mac"] == mac)


def wait_gone(path, timeout=10):
    deadline = time.time() + timeout
    while path.exists():
        assert time.time() < deadline, f"{path} is still there"
        time.sleep(0.1)


def test_running_sessions_keep_their_image_across_a_replace_and_the_old_one_goes_with_them(lab, tmp_path):
    old, new, newer = ((tmp_path / f"os{n}.raw").read_bytes() for n in (1, 2, 3))
    a = attach(lab, "aa:bb:cc:00:00:01")
    assert a.pread(8 * MIB, 0) == old[:8 * MIB]

    out = lab.cli("vdisk", "import", str(tmp_path / "os2.raw"), "os", "--backend", "images", "--replace", "--quiet")
    assert 'now boots image "os-v2"; 1 live session(s) keep reading "os"' in out.stderr, out.stderr
    # The running client reads on, the rest of its disk included: the old image, exactly.
    assert a.pread(8 * MIB, 8 * MIB) == old[8 * MIB:]
    b = attach(lab, "aa:bb:cc:00:00:02")
    assert read_all(b) == new
    assert (lab.images / "os.img").exists() and (lab.images / "os-v2.img").exists()

    # A second replace while both run: each keeps its own.
    lab.cli("vdisk", "import", str(tmp_path / "os3.raw"), "os", "--backend", "images", "--replace", "--quiet")
    c = attach(lab, "aa:bb:cc:00:00:03")
    assert read_all(c) == newer and read_all(a) == old and read_all(b) == new
    assert json.loads(lab.cli("--json", "vdisk", "show", "os").stdout)["key"] == "os-v3"

    # The old images leave with their last sessions.
    a.shutdown()
    lab.cli("session", "close", session_of(lab, "aa:bb:cc:00:00:01"))
    wait_gone(lab.images / "os.img")
    assert (lab.images / "os-v2.img").exists()
    b.shutdown()
    lab.cli("session", "close", session_of(lab, "aa:bb:cc:00:00:02"))
    wait_gone(lab.images / "os-v2.img")
    assert read_all(c) == newer
    c.shutdown()
    log = lab.log.read_text()
    assert 'old image of a replaced vdisk deleted: its last session ended vdisk=os backend=images key=os' in log
    assert "key=os-v2" in log


def test_a_replace_with_no_session_on_the_old_image_deletes_it_soon(lab, tmp_path):
    lab.cli("vdisk", "import", str(tmp_path / "os2.raw"), "os", "--backend", "images", "--replace", "--quiet")
    wait_gone(lab.images / "os.img")
    h = attach(lab, "aa:bb:cc:00:00:01")
    assert read_all(h) == (tmp_path / "os2.raw").read_bytes()


def test_an_image_changed_in_place_fails_its_readers_and_never_mixes_bytes(lab, tmp_path):
    old = (tmp_path / "os1.raw").read_bytes()
    a = attach(lab, "aa:bb:cc:00:00:01")
    assert a.pread(4 * MIB, 0) == old[:4 * MIB]
    # Written over in place, behind osstream's back.
    shutil.copyfile(tmp_path / "os2.raw", lab.images / "os.img")
    failures = 0
    for offset in range(0, 16 * MIB, MIB):
        try:
            data = a.pread(MIB, offset)
        except nbd.Error as err:
            assert "Input/output error" in str(err) or err.errno == 5, err
            failures += 1
            continue
        assert data == old[offset:offset + MIB], f"new or mixed bytes at {offset}"
    assert failures >= 12, failures  # the first 4 MiB may still come from the cache
    assert "was changed in place while clients read it" in lab.log.read_text()
    assert lab.alive()


def test_a_session_whose_image_changed_in_place_is_not_served_over_the_new_image(lab, tmp_path):
    uri = lab.cli("session", "open", "aa:bb:cc:00:00:01", "os").stdout.strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"Y" * 4096, 0)
    h.flush()
    h.shutdown()
    shutil.copyfile(tmp_path / "os2.raw", lab.images / "os.img")
    # The session's overlay was made over the old image: reconnecting is refused, not
    # served with the client's writes on top of another disk.
    again = nbd.NBD()
    with pytest.raises(nbd.Error):
        again.connect_uri(uri)
    assert "changed in place while the session lived" in lab.log.read_text()
    # A new boot (a new session) gets the new image.
    fresh = attach(lab, "aa:bb:cc:00:00:01")
    assert read_all(fresh) == (tmp_path / "os2.raw").read_bytes()
