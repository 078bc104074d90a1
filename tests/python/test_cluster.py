"""Two servers on one PostgreSQL catalog and one S3 bucket (s3rver): a session is held by
one server at a time, and no flushed write is lost when a private vdisk's lock moves
between them, whether its session is replaced, its server paused past its timeout, or a
probe comes through the other server (issue 12, items 9-11)."""

import json
import os
import signal
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, Server, backend_toml, random_image

MIB = 1 << 20
CHUNK = 256 * 1024


class Cluster:
    def __init__(self, tmp_path, postgres, s3):
        extra = (f'[catalog]\nurl = "{postgres}"\n'
                 + backend_toml("bucket", s3, f'layout = "chunked"\nchunk_size = "{CHUNK // 1024}KiB"\nwritable = true')
                 + '[sessions]\nreconcile_interval = "200ms"\nserver_timeout = "2s"\n'
                 '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n')
        self.servers = []
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            self.servers.append(Server(folder, extra, demo=False))
        self.a, self.b = self.servers
        raw = tmp_path / "dev.raw"
        random_image(raw, 4 * MIB, seed=31)
        self.base = raw.read_bytes()
        self.tmp = tmp_path
        self.cli("vdisk", "import", str(raw), "dev", "--backend", "bucket", "--mode", "private", "--quiet")
        random_image(raw, 4 * MIB, seed=32)
        self.cli("vdisk", "import", str(raw), "std", "--backend", "bucket", "--write-cache", "ram", "--quiet")
        for mac in ("aa:bb:cc:00:00:81", "aa:bb:cc:00:00:82"):
            self.cli("client", "add", mac)
            self.cli("client", "assign", mac, "dev")
            self.cli("client", "assign", mac, "std")
        for server in self.servers:
            server.start()

    def cli(self, *args, ok=True):
        out = subprocess.run([BINARY, "--config", str(self.a.config), *args], capture_output=True, text=True,
                             timeout=120)
        if ok is not None:
            assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out

    def open_session(self, mac, vdisk):
        """The session's export name (`s/<token>`)."""
        return json.loads(self.cli("--json", "session", "open", mac, vdisk).stdout)["export"]

    def exported(self):
        out = self.tmp / f"export-{time.monotonic_ns()}.raw"
        self.cli("vdisk", "export", "dev", str(out), "--quiet")
        data = out.read_bytes()
        out.unlink()
        return data

    def stop(self):
        for server in self.servers:
            if server.proc and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)
            server.stop()


@pytest.fixture
def cluster(tmp_path, postgres, s3):
    c = Cluster(tmp_path, postgres, s3)
    yield c
    c.stop()


def connect(server, export):
    h = nbd.NBD()
    h.connect_uri(server.uri(export))
    return h


def refusal(server, export):
    out = subprocess.run(["nbdinfo", server.uri(export)], capture_output=True, text=True,
                         env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0, out.stdout
    return next(line.split("server error message:", 1)[1].strip()
                for line in out.stderr.splitlines() if "server error message:" in line)


def test_a_session_held_by_one_server_is_refused_by_the_other(cluster):
    dev = cluster.open_session("aa:bb:cc:00:00:81", "dev")
    on_a = connect(cluster.a, dev)
    on_a.pwrite(b"A" * 4096, 0)
    on_a.flush()
    # The same token through B, twice (a probe, then a client): refused, naming A.
    for _ in range(2):
        message = refusal(cluster.b, dev)
        assert "is attached on server" in message and f"127.0.0.1:{cluster.a.port}" in message, message
    # A's client carries on: the probe through B ended nothing.
    on_a.pwrite(b"B" * 4096, 4096)
    on_a.flush()
    assert on_a.pread(8192, 0) == b"A" * 4096 + b"B" * 4096
    # A standard session's overlay stays where it is: B refuses its token too.
    std = cluster.open_session("aa:bb:cc:00:00:82", "std")
    std_on_a = connect(cluster.a, std)
    std_on_a.pwrite(b"overlay on A", 0)
    message = refusal(cluster.b, std)
    assert "keeps its write overlay on server" in message and "connect there" in message, message
    assert std_on_a.pread(12, 0) == b"overlay on A"
    sessions = json.loads(cluster.cli("--json", "session", "list").stdout)
    assert {s["owner"] for s in sessions} == {
        (cluster.a.data_dir / "server-id").read_text().strip()}, sessions
    on_a.shutdown()
    std_on_a.shutdown()


def test_replacing_a_session_through_the_other_server_loses_no_flushed_write(cluster):
    first = cluster.open_session("aa:bb:cc:00:00:81", "dev")
    on_a = connect(cluster.a, first)
    on_a.pwrite(b"\xa0" * 4096, 0)
    on_a.flush()
    on_a.pwrite(b"\xa1" * 4096, CHUNK)  # not flushed: held in A's memory
    # The client boots again and reaches B: its new session replaces the old one.
    second = cluster.open_session("aa:bb:cc:00:00:81", "dev")
    on_b = connect(cluster.b, second)  # waits until A let go of the old session
    assert on_b.pread(4096, 0) == b"\xa0" * 4096, "A's flushed write is there"
    assert on_b.pread(4096, CHUNK) == cluster.base[CHUNK:CHUNK + 4096], "A's unflushed write is not"
    on_b.pwrite(b"\xb1" * 4096, CHUNK)
    on_b.flush()
    time.sleep(2.5)  # the window in which A once uploaded its old chunk over B's
    data = cluster.exported()
    assert data[:4096] == b"\xa0" * 4096
    assert data[CHUNK:CHUNK + 4096] == b"\xb1" * 4096, "B's flushed write survived"
    assert "unflushed chunks were not stored" in cluster.a.log.read_text()
    with pytest.raises(nbd.Error):
        on_a.pread(512, 0)
    on_b.shutdown()


def test_a_paused_server_acknowledges_nothing_after_its_lock_moved(cluster):
    dev = cluster.open_session("aa:bb:cc:00:00:81", "dev")
    on_a = connect(cluster.a, dev)
    on_a.pwrite(b"\xa0" * 4096, 0)
    on_a.flush()
    cluster.a.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(3.5)  # past server_timeout (2s): A is gone for B
        on_b = connect(cluster.b, dev)
        assert on_b.pread(4096, 0) == b"\xa0" * 4096
        on_b.pwrite(b"\xb0" * 4096, 0)
        on_b.flush()
    finally:
        cluster.a.proc.send_signal(signal.SIGCONT)
    # A wakes up with its client still connected: nothing it writes is acknowledged.
    with pytest.raises(nbd.Error):
        on_a.pwrite(b"\xa9" * 4096, 0)
        on_a.flush()
    assert on_b.pread(4096, 0) == b"\xb0" * 4096
    on_b.shutdown()
    assert cluster.exported()[:4096] == b"\xb0" * 4096, "B's flushed write survived A's wake-up"
    log = cluster.b.log.read_text()
    assert "released: its server" in log or "stopped or missed heartbeats" in log, log


def test_a_server_whose_server_timeout_differs_is_named_at_start(tmp_path, postgres):
    servers = []
    for name, timeout in (("a", "2s"), ("b", "3s")):
        folder = tmp_path / name
        folder.mkdir()
        servers.append(Server(folder, f'[catalog]\nurl = "{postgres}"\n[sessions]\nreconcile_interval = "200ms"\n'
                                      f'server_timeout = "{timeout}"\n', demo=False).start())
    try:
        text = servers[1].log.read_text()
        assert "server_timeout differs from a server sharing this catalog" in text, text
        assert "server_timeout differs" not in servers[0].log.read_text()
    finally:
        for server in servers:
            server.stop()
