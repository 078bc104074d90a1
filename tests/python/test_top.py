"""`osstream top` and `session list --watch`: a live view of the clients a running server
serves, read from its stats.json and the catalog while a real NBD client reads."""

import json
import re
import signal
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, free_port, random_image

MIB = 1 << 20
MAC = "aa:bb:cc:00:00:07"


@pytest.fixture
def lab(make_server):
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\n'
                    # A boot ends 2 s after its last new block: time to see it booting.
                    '[profile]\nquiet = "2s"\nmin_bytes = "64KiB"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    random_image(s.images / "deb.img", 16 * MIB, seed=7)
    s.start()
    s.cli("vdisk", "add", "deb", "--backend", "images", "--write-cache", "ram")
    s.cli("client", "add", MAC, "--hostname", "lab-pc-07")
    s.cli("client", "assign", MAC, "deb")
    return s


def top(server, *args):
    out = subprocess.run([BINARY, "--config", str(server.config), "top", "--once", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def top_json(server):
    return json.loads(top(server, "--json"))


def until(what, check, timeout=10):
    """Polls `check` (which returns a value or None) until it gives a value."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def our_row(view):
    rows = [r for r in view["clients"] if r["client"] == MAC]
    return rows[0] if rows else None


def test_top_shows_a_connected_client_its_bytes_and_its_boot(lab):
    uri = lab.cli("session", "open", MAC, "deb")
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = iter(range(64, 256))

    def still_booting():
        """Reads a block not read before: the boot goes on for another `quiet`."""
        h.pread(4096, next(blocks) * 65536)

    try:
        h.pread(MIB, 0)

        def read_shows():
            still_booting()
            row = our_row(top_json(lab))
            return row if row and row["connections"] == 1 and row["read_bytes"] >= MIB else None

        # The server rewrites stats.json every 2 s: the read shows within a refresh.
        row = until("the read in stats.json", read_shows)
        assert row["vdisk"] == "deb" and row["hostname"] == "lab-pc-07"
        assert row["protocols"] == ["nbd"] and row["peers"][0].startswith("127.0.0.1")
        assert row["boot"]["state"] == "booting", row
        still_booting()
        view = top_json(lab)
        assert view["totals"]["connections"] == 1 and view["totals"]["sessions"] == 1
        assert view["cache"][0]["tier"] == "ram" and view["cache"][0]["misses"] > 0
        assert view["boots_watched"] is True
        still_booting()
        table = top(lab)
        assert re.search(rf"{MAC} lab-pc-07\s+deb\s+nbd\s+127\.0\.0\.1:\d+", table), table
        assert re.search(r"\d\.\dMiB\s+0B\s+-\s+-\s+booting \d+s", table), table
        assert "cache hit ratio ram" in table and "1 session(s), 1 connection(s)" in table, table

        # Quiet from here: the boot is complete when the quiet began.
        until("the boot profile", lambda: "boot profile recorded" in lab.log.read_text() or None, timeout=30)
        row = until("the boot in stats.json",
                    lambda: (r := our_row(top_json(lab))) and r["boot"]["state"] == "booted" and r or None)
        assert 0 < row["boot"]["seconds"] < 30, row
        assert re.search(r"booted in \d+\.\ds", top(lab)), top(lab)
    finally:
        h.shutdown()


def test_top_without_a_running_server_says_so(make_server):
    s = make_server(start=False)
    out = subprocess.run([BINARY, "--config", str(s.config), "top", "--once"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and out.stdout == ""
    assert "no server has run on data_dir" in out.stderr and "osstream serve" in out.stderr, out.stderr
    s.start()
    s.stop()
    out = subprocess.run([BINARY, "--config", str(s.config), "top", "--once"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "is not running: it stopped" in out.stderr, out.stderr


def test_top_refreshes_until_interrupted(lab):
    """Without --once (stdout a pipe): a table per interval, each with rates, until SIGINT."""
    proc = subprocess.Popen([BINARY, "--config", str(lab.config), "top", "--interval", "300ms"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert out.count("osstream top: server") >= 3, out
    assert "\x1b[" not in out, "no ANSI sequences when stdout is not a terminal"
    assert "Ctrl-C" in out


def test_session_list_watch(lab):
    uri = lab.cli("session", "open", MAC, "deb")
    out = lab.cli("session", "list", "--watch", "--once")
    assert re.search(r"osstream session list: 1 session\(s\) at ", out), out
    assert MAC in out and "waiting for its client" in out, out
    sessions = json.loads(lab.cli("--json", "session", "list", "--watch", "--once"))
    assert [s["mac"] for s in sessions] == [MAC]
    assert uri.endswith(sessions[0]["token"])
    # Watching, with JSON: one document per line per refresh.
    proc = subprocess.Popen([BINARY, "--config", str(lab.config), "--json", "session", "list", "--watch",
                             "--interval", "200ms"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) >= 3 and all(json.loads(line)[0]["mac"] == MAC for line in lines), out
    bad = subprocess.run([BINARY, "--config", str(lab.config), "session", "list", "--once"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--once and --interval go with --watch" in bad.stderr, bad.stderr
