"""Sessions over NBD: per-client overlays, private locks, tokens, persistence across a
crash, and catalog changes reaching a running server."""

import os
import signal
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, random_image, sha256, start_postgres, wait_for

MIB = 1 << 20


def build_lab(make_server, sessions_extra=""):
    """A running server with three vdisks and two clients, and a CLI on its config."""
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    f'[sessions]\nreconcile_interval = "200ms"\nram_capacity = "1MiB"\n{sessions_extra}'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    for name, seed in (("win11", 1), ("dev", 2), ("kiosk", 3)):
        random_image(s.images / f"{name}.img", 16 * MIB, seed=seed)
    s.start()

    def cli(*args, ok=True):
        out = subprocess.run([BINARY, "--config", str(s.config), *args], capture_output=True, text=True, timeout=60)
        if ok is not None:
            assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out

    cli("vdisk", "add", "win11", "--backend", "images", "--write-cache", "ram-overflow-disk")
    cli("vdisk", "add", "dev", "--backend", "images", "--mode", "private")
    cli("vdisk", "add", "kiosk", "--backend", "images", "--write-cache", "server-disk-persistent")
    for mac in ("aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02"):
        cli("client", "add", mac)
        for vdisk in ("win11", "dev", "kiosk"):
            cli("client", "assign", mac, vdisk)
    s.cli = cli
    return s


@pytest.fixture
def lab(make_server):
    return build_lab(make_server)


def open_session(lab, mac, vdisk):
    return lab.cli("session", "open", mac, vdisk).stdout.strip()


def sessions(lab, all=False):
    import json
    return json.loads(lab.cli("--json", "session", "list", *(["--all"] if all else [])).stdout)


def session_id(lab, mac):
    return next(s["id"] for s in sessions(lab) if s["mac"] == mac)


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def refusal(uri):
    """The option error the server sent for `uri` (libnbd shows it in its debug log)."""
    out = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0
    return next(line.split("server error message:", 1)[1].strip()
                for line in out.stderr.splitlines() if "server error message:" in line)


def test_two_clients_write_one_standard_vdisk_and_each_sees_only_its_own(lab):
    base = sha256(lab.images / "win11.img")
    a = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    b = connect(open_session(lab, "aa:bb:cc:00:00:02", "win11"))
    assert not a.is_read_only() and a.can_flush()
    a.pwrite(b"A" * 100_000, 3 * MIB + 7)
    b.pwrite(b"B" * 50_000, 3 * MIB + 1000)
    a.flush()
    b.flush()
    got_a = a.pread(200_000, 3 * MIB)
    got_b = b.pread(200_000, 3 * MIB)
    assert got_a[7:100_007] == b"A" * 100_000
    assert got_b[1000:51_000] == b"B" * 50_000
    assert b"B" * 100 not in got_a and b"A" * 100 not in got_b
    a.shutdown()
    b.shutdown()
    assert sha256(lab.images / "win11.img") == base, "the base image is never written"


def test_a_private_vdisk_has_one_writer_at_a_time(lab):
    uri_a = open_session(lab, "aa:bb:cc:00:00:01", "dev")
    refused = lab.cli("session", "open", "aa:bb:cc:00:00:02", "dev", ok=False).stderr
    assert 'private vdisk "dev" is in use by session' in refused and "aa:bb:cc:00:00:01" in refused
    a = connect(uri_a)
    a.pwrite(b"private write", 4096)
    a.flush()
    a.shutdown()
    time.sleep(0.3)
    # The writer disconnected, but its session (and lock) lives on for the grace period.
    assert "is in use by session" in lab.cli("session", "open", "aa:bb:cc:00:00:02", "dev", ok=False).stderr
    sid = session_id(lab, "aa:bb:cc:00:00:01")
    lab.cli("session", "close", sid)
    b = connect(open_session(lab, "aa:bb:cc:00:00:02", "dev"))
    assert b.pread(13, 4096) == b"private write", "private writes reach the vdisk itself"
    b.shutdown()
    with open(lab.images / "dev.img", "rb") as f:
        f.seek(4096)
        assert f.read(13) == b"private write"


def test_tokens_are_checked(lab):
    uri = open_session(lab, "aa:bb:cc:00:00:01", "win11")
    base = uri.rsplit("/", 1)[0]
    assert refusal(f"{base}/{'0' * 48}").startswith("not found: unknown session token")
    assert "plain image names are off" in refusal(lab.uri("win11"))
    # Taking the vdisk away makes the token useless at once.
    lab.cli("client", "unassign", "aa:bb:cc:00:00:01", "win11")
    assert 'vdisk "win11" is not assigned to client aa:bb:cc:00:00:01' in refusal(uri)
    log = lab.log.read_text()
    assert "session export refused" in log and "peer" in log
    # A client retrying (each time from a new port) is logged once per 30 s, not per try.
    for _ in range(5):
        refusal(uri)
    log = lab.log.read_text()
    assert log.count("is not assigned to client aa:bb:cc:00:00:01") == 1, log
    assert "NBD connection closed during handshake" not in log, log


def test_a_new_boot_replaces_the_old_session_and_its_overlay(lab):
    first = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    first.pwrite(b"old boot", 0)
    second = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    assert second.pread(8, 0) != b"old boot", "a new session starts from the base"
    with pytest.raises(nbd.Error):
        for _ in range(50):
            first.pread(512, 0)
            time.sleep(0.05)
    second.shutdown()


def test_closing_a_session_in_the_catalog_ends_its_connections(lab):
    h = connect(open_session(lab, "aa:bb:cc:00:00:02", "win11"))
    h.pread(512, 0)
    session = lab.cli("--json", "session", "list").stdout
    import json
    sid = json.loads(session)[0]["id"]
    lab.cli("session", "close", sid)
    with pytest.raises(nbd.Error):
        for _ in range(60):
            h.pread(512, 0)
            time.sleep(0.05)
    assert "ending the session's connections here: it ended: closed by an administrator" in lab.log.read_text()
    # Its connection's end is not taken for a client that may come back.
    wait_for("the detach to be logged",
             lambda: "the session had ended: closed by an administrator" in lab.log.read_text())


def test_a_full_ram_overlay_gives_enospc_and_keeps_serving(lab):
    lab.cli("vdisk", "set", "win11", "--write-cache", "ram")
    h = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    h.pwrite(b"x" * MIB, 0)  # exactly the 1 MiB capacity
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"y" * 4096, 8 * MIB)
    assert err.value.errno in ("ENOSPC", 28)
    assert h.pread(4096, 0) == b"x" * 4096
    h.shutdown()


def test_flushed_writes_on_a_persistent_overlay_survive_kill_9(lab):
    uri = open_session(lab, "aa:bb:cc:00:00:01", "kiosk")
    for round_ in range(3):
        h = connect(uri)
        if round_ > 0:
            for previous in range(round_):
                assert h.pread(6, previous * MIB) == f"round{previous}".encode(), f"round {previous} lost"
        h.pwrite(f"round{round_}".encode(), round_ * MIB)
        h.flush()
        lab.proc.send_signal(signal.SIGKILL)
        lab.proc.wait()
        lab.start()
    # A new boot of the client (a new session) keeps the persistent overlay too.
    h = connect(open_session(lab, "aa:bb:cc:00:00:01", "kiosk"))
    assert h.pread(6, 2 * MIB) == b"round2"
    h.shutdown()


def test_server_disk_overlays_survive_a_server_restart_but_not_a_new_boot(lab):
    lab.cli("vdisk", "set", "win11", "--write-cache", "server-disk")
    uri = open_session(lab, "aa:bb:cc:00:00:02", "win11")
    h = connect(uri)
    h.pwrite(b"same session", 0)
    h.flush()
    lab.proc.send_signal(signal.SIGKILL)
    lab.proc.wait()
    lab.start()
    h = connect(uri)
    assert h.pread(12, 0) == b"same session", "a server restart is not the client's next session"
    h.shutdown()
    h = connect(open_session(lab, "aa:bb:cc:00:00:02", "win11"))
    assert h.pread(12, 0) != b"same session", "the next session starts from the base"
    h.shutdown()


def test_an_unused_private_session_expires_and_frees_its_lock(make_server):
    lab = build_lab(make_server, 'lease = "1s"\ngrace = "1s"\n')
    held = connect(open_session(lab, "aa:bb:cc:00:00:01", "dev"))
    time.sleep(2.0)
    # A connected session is kept alive by its server: still locked.
    assert "is in use by session" in lab.cli("session", "open", "aa:bb:cc:00:00:02", "dev", ok=False).stderr
    held.shutdown()
    # Its last connection closed: the grace period ends it and frees the lock.
    deadline = time.time() + 10
    while lab.cli("session", "open", "aa:bb:cc:00:00:02", "dev", ok=None).returncode != 0:
        assert time.time() < deadline, "the disconnected private session never ended"
        time.sleep(0.3)
    assert "no connection for 1s after its last one closed" in lab.log.read_text()
    # Opened but never connected (a client that died while booting): the lease ends it.
    deadline = time.time() + 10
    while lab.cli("session", "open", "aa:bb:cc:00:00:01", "dev", ok=None).returncode != 0:
        assert time.time() < deadline, "the idle private session never expired"
        time.sleep(0.3)
    assert "nobody connected within the lease" in lab.log.read_text()
    ended = [s for s in sessions(lab, all=True) if s["end_reason"]]
    assert any("nobody connected within the lease" in s["end_reason"] for s in ended), ended


def test_two_live_peers_on_one_session_are_logged_as_a_conflict(lab):
    import socket
    import struct
    uri = open_session(lab, "aa:bb:cc:00:00:01", "win11")
    first = connect(uri)
    token = uri.rsplit("/", 1)[1]
    # A second machine claiming the same client: connect from another loopback address.
    raw = socket.socket()
    raw.bind(("127.0.0.2", 0))
    raw.connect(("127.0.0.1", lab.port))
    assert raw.recv(18)[:8] == b"NBDMAGIC"
    raw.sendall(struct.pack(">I", 3))
    name = f"s/{token}".encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    raw.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    deadline = time.time() + 5
    while "two live peers claim one client" not in lab.log.read_text():
        assert time.time() < deadline, "no conflict logged"
        time.sleep(0.1)
    raw.close()
    first.shutdown()


def test_the_server_and_cli_run_on_a_postgresql_catalog(make_server, tmp_path):
    url, stop_pg = start_postgres(tmp_path)
    s = None
    try:
        s = make_server(f'[catalog]\nurl = "{url}"\n[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n',
                        start=False, demo=False)
        random_image(s.images / "shared.img", 8 * MIB, seed=9)
        s.start()

        def cli(*words):
            return subprocess.run([BINARY, "--config", str(s.config), *words], check=True,
                                  capture_output=True, text=True).stdout.strip()

        cli("vdisk", "add", "shared", "--backend", "images", "--write-cache", "ram")
        cli("client", "add", "aa:bb:cc:00:00:07")
        cli("client", "assign", "aa:bb:cc:00:00:07", "shared")
        h = connect(cli("session", "open", "aa:bb:cc:00:00:07", "shared"))
        h.pwrite(b"on postgres", 0)
        assert h.pread(11, 0) == b"on postgres"
        h.shutdown()
        time.sleep(0.3)
        import json
        sessions = json.loads(cli("--json", "session", "list"))
        assert sessions[0]["bytes_written"] == 11 and sessions[0]["peer"].startswith("127.0.0.1:")
        assert not (s.data_dir / "catalog.db").exists(), "no SQLite file when PostgreSQL is configured"
        assert "catalog ready catalog=postgres" in s.log.read_text().replace('"', "")
    finally:
        if s:
            s.stop()
        stop_pg()


def test_a_ram_overlay_lost_in_a_server_crash_makes_the_client_boot_again(lab):
    lab.cli("vdisk", "set", "win11", "--write-cache", "ram")
    uri = open_session(lab, "aa:bb:cc:00:00:01", "win11")
    h = connect(uri)
    h.pwrite(b"only in RAM", 0)
    lab.proc.send_signal(signal.SIGKILL)
    lab.proc.wait()
    lab.start()
    # Serving the base under a mounted filesystem would corrupt it: refuse instead, and
    # list the session as ended, with the reason (issue 12, item 8).
    assert "the server restarted and the session's RAM write overlay was lost" in refusal(uri)
    assert not [s for s in sessions(lab) if s["vdisk"] == "win11"], "not shown live"
    ended = [s for s in sessions(lab, all=True) if s["vdisk"] == "win11"]
    assert ended[0]["closed_at"] and "RAM write overlay was lost" in ended[0]["end_reason"], ended
    table = lab.cli("session", "list", "--all").stdout
    assert "ended: the server restarted" in table, table
    h = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    assert h.pread(11, 0) != b"only in RAM"
    h.shutdown()


def test_unlocking_a_private_vdisk_ends_the_holders_session(lab):
    uri = open_session(lab, "aa:bb:cc:00:00:01", "dev")
    h = connect(uri)
    # Its client is writing: unlock says what that would risk, and needs --force.
    refused = lab.cli("vdisk", "unlock", "dev", ok=False).stderr
    assert "attached on server" in refused and "--force" in refused and "may still land" in refused, refused
    forced = lab.cli("vdisk", "unlock", "dev", "--force").stderr
    assert "warning: unlocking while session" in forced
    with pytest.raises(nbd.Error):
        for _ in range(60):
            h.pwrite(b"x", 0)
            time.sleep(0.05)
    open_session(lab, "aa:bb:cc:00:00:02", "dev")


def test_whole_disk_zeroing_and_trim_cost_an_overlay_nothing(make_server):
    """Issue 12, item 5: `blkdiscard`/`mkfs` on a standard vdisk store zero markers, not
    zero blocks: a 1 GiB vdisk zeroed through a 64 MiB RAM overlay reads back zeroes, shows
    as zero in base:allocation, and still takes 32 MiB of writes; a disk overlay's files
    stay small."""
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\n'
                    '[sessions]\nram_capacity = "64MiB"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    image = s.images / "big.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
        for offset in (0, 300 * MIB, (1 << 30) - MIB):
            f.seek(offset)
            f.write(os.urandom(MIB))
    s.start()

    def cli(*args):
        return subprocess.run([BINARY, "--config", str(s.config), *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    cli("vdisk", "add", "big", "--backend", "images", "--write-cache", "ram")
    cli("vdisk", "add", "big-disk", "--backend", "images", "--key", "big", "--write-cache", "server-disk")
    cli("client", "add", "aa:bb:cc:00:00:51")
    cli("client", "assign", "aa:bb:cc:00:00:51", "big")
    cli("client", "assign", "aa:bb:cc:00:00:51", "big-disk")

    def zero_everything(h):
        h.zero(1 << 30, 0)
        assert h.pread(MIB, 0) == bytes(MIB) and h.pread(MIB, (1 << 30) - MIB) == bytes(MIB)
        h.trim(1 << 30, 0)
        assert h.pread(MIB, 300 * MIB) == bytes(MIB)
        seen = []
        h.block_status(1 << 30, 0, lambda ctx, offset, entries, err: seen.extend(entries) or 0)
        assert seen and all(flags & nbd.STATE_ZERO for flags in seen[1::2]), seen[:8]

    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(cli("session", "open", "aa:bb:cc:00:00:51", "big"))
    zero_everything(h)
    for i in range(32):
        h.pwrite(bytes([i + 1]) * MIB, i * 7 * MIB)
    assert h.pread(MIB, 31 * 7 * MIB) == bytes([32]) * MIB
    h.shutdown()

    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(cli("session", "open", "aa:bb:cc:00:00:51", "big-disk"))
    h.pwrite(os.urandom(8 * MIB), 0)
    h.flush()
    zero_everything(h)
    h.flush()
    folders = list((s.data_dir / "overlays").glob("aa-bb-cc-00-00-51/big-disk/session-*"))
    assert len(folders) == 1, folders
    used = sum(p.stat().st_blocks * 512 for p in folders[0].iterdir())
    assert used < MIB, f"the disk overlay holds {used} bytes after zeroing the disk"
    h.shutdown()


def test_a_probe_and_reconnects_keep_a_private_session(make_server):
    """Issue 12, item 6: a boot opens several connections (firmware, initramfs, the OS);
    a probe such as nbdinfo between them must not end the session."""
    lab = build_lab(make_server, 'grace = "2s"\n')
    uri = open_session(lab, "aa:bb:cc:00:00:01", "dev")
    info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    h = connect(uri)  # the next connection of the boot
    h.pwrite(b"first boot stage", 0)
    h.flush()
    h.shutdown()
    h = connect(uri)  # and the one after that
    assert h.pread(16, 0) == b"first boot stage"
    h.shutdown()
    # The server notes the last disconnect once its side of the connection has closed
    # (after flushing the private vdisk), a moment after the client's shutdown returns.
    deadline = time.time() + 10
    while "it ends after the grace period unless the client comes back" not in lab.log.read_text():
        assert time.time() < deadline, lab.log.read_text()[-2000:]
        time.sleep(0.05)
    log = lab.log.read_text()
    assert "has ended" not in log and "lock released" not in log
    # With no connection for the grace period, it ends, and says why.
    deadline = time.time() + 10
    while not [s for s in sessions(lab, all=True) if s["end_reason"]]:
        assert time.time() < deadline, "the session never ended"
        time.sleep(0.2)
    assert "has ended: no connection for 2s after its last one closed" in refusal(uri)
    assert "session ended: no connection for 2s" in lab.log.read_text()


def test_overlay_folders_of_ended_sessions_are_removed(lab):
    lab.cli("vdisk", "set", "win11", "--write-cache", "server-disk")
    overlays = lab.data_dir / "overlays"
    h = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    h.pwrite(b"x" * 4096, 0)
    h.flush()
    kiosk = connect(open_session(lab, "aa:bb:cc:00:00:02", "kiosk"))
    kiosk.pwrite(b"kept", 0)
    kiosk.flush()
    folders = list(overlays.glob("*/win11/session-*"))
    assert len(folders) == 1
    lab.cli("session", "close", session_id(lab, "aa:bb:cc:00:00:01"))
    deadline = time.time() + 10
    while folders[0].exists():
        assert time.time() < deadline, "the overlay of a closed session stayed behind"
        time.sleep(0.2)
    # vdisk rm --force ends the sessions of the vdisk; a persistent overlay stays.
    lab.cli("vdisk", "set", "win11", "--write-cache", "server-disk")
    h = connect(open_session(lab, "aa:bb:cc:00:00:02", "win11"))
    h.pwrite(b"y" * 4096, 0)
    h.flush()
    folders = list(overlays.glob("*/win11/session-*"))
    assert len(folders) == 1
    lab.cli("vdisk", "rm", "win11", "--force")
    deadline = time.time() + 10
    while list(overlays.glob("*/win11")):
        assert time.time() < deadline, "the overlay of a removed vdisk's session stayed behind"
        time.sleep(0.2)
    assert list(overlays.glob("aa-bb-cc-00-00-02/kiosk/persistent/overlay.data")), "persistent overlays stay"


def test_a_shared_disk_overlay_lives_in_the_shared_folder_and_is_removed_when_its_session_ends(make_server):
    """`shared-disk` keeps a session's overlay under `[sessions] shared_overlay_dir` (the
    folder every server mounts, so the session can move); such a session is refused when
    no running server has the folder; the folder goes once the session ended."""
    lab = build_lab(make_server, 'shared_overlay_dir = "shared"\n')
    lab.cli("vdisk", "set", "win11", "--write-cache", "shared-disk")
    h = connect(open_session(lab, "aa:bb:cc:00:00:01", "win11"))
    h.pwrite(b"s" * 4096, 8192)
    h.flush()
    assert h.pread(4096, 8192) == b"s" * 4096
    shared = lab.data_dir / "shared"
    folders = list(shared.glob("aa-bb-cc-00-00-01/win11/session-*"))
    assert len(folders) == 1 and (folders[0] / "overlay.map").exists(), list(shared.rglob("*"))
    assert not list((lab.data_dir / "overlays").glob("*/win11/session-*"))
    h.shutdown()
    lab.cli("session", "close", session_id(lab, "aa:bb:cc:00:00:01"))
    deadline = time.time() + 15
    while folders[0].exists():
        assert time.time() < deadline, "the shared overlay of a closed session stayed behind"
        time.sleep(0.2)
    lab.stop()

    # No running server has the folder: the session is refused when opened.
    plain = build_lab(make_server)
    plain.cli("vdisk", "set", "win11", "--write-cache", "shared-disk")
    refused = plain.cli("session", "open", "aa:bb:cc:00:00:02", "win11", ok=False).stderr
    assert "no running server has [sessions] shared_overlay_dir" in refused, refused


def open_on_a_server_started_with(make_server, listen, mac):
    """`session open` for a vdisk of a server started with `serve --listen LISTEN` (its
    configuration file says 127.0.0.1:1); returns the finished command."""
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\n[nbd]\nbase_exports = false\n'
                    'listen = ["127.0.0.1:1"]\n', start=False, demo=False)
    random_image(s.images / "os.img", MIB, seed=8)
    s.start(args=["--listen", listen.replace("PORT", str(s.port))])

    def cli(*args):
        return subprocess.run([BINARY, "--config", str(s.config), *args], check=True, capture_output=True,
                              text=True)
    cli("vdisk", "add", "os", "--backend", "images")
    cli("client", "add", mac)
    cli("client", "assign", mac, "os")
    return s, cli("session", "open", mac, "os")


def test_session_open_prints_the_address_a_running_server_listens_on(make_server):
    """Issue 12, item 7: `serve --listen` is reflected (the server registers its address)."""
    s, out = open_on_a_server_started_with(make_server, "127.0.0.1:PORT", "aa:bb:cc:00:00:61")
    uri = out.stdout.strip()
    assert uri.startswith(f"nbd://127.0.0.1:{s.port}/s/"), uri
    h = connect(uri)
    assert h.get_size() == MIB
    h.shutdown()


def test_session_open_does_not_guess_when_the_running_server_listens_on_a_wildcard(make_server):
    _, out = open_on_a_server_started_with(make_server, "0.0.0.0:PORT", "aa:bb:cc:00:00:62")
    assert out.stdout.startswith("s/") and "127.0.0.1:1" not in out.stdout, out.stdout
    assert "listen on a wildcard address" in out.stderr and "public_address" in out.stderr, out.stderr


def test_session_open_prints_the_unix_socket_of_a_running_server(make_server, tmp_path):
    sock = tmp_path / "nbd.sock"
    _, out = open_on_a_server_started_with(make_server, f"unix:{sock}", "aa:bb:cc:00:00:63")
    uri = out.stdout.strip()
    assert uri.startswith("nbd+unix:///s/") and uri.endswith(f"?socket={sock}"), uri
    h = connect(uri)
    assert h.get_size() == MIB
    h.shutdown()


def test_a_short_stall_of_the_server_does_not_fail_a_private_write(make_server):
    """A pause shorter than server_timeout (nobody took over) costs the client nothing:
    the first write after it confirms the lock with the catalog instead of failing."""
    lab = build_lab(make_server, 'server_timeout = "2s"\n')
    h = connect(open_session(lab, "aa:bb:cc:00:00:01", "dev"))
    h.pwrite(b"before", 0)
    h.flush()
    lab.proc.send_signal(signal.SIGSTOP)
    time.sleep(1.5)
    lab.proc.send_signal(signal.SIGCONT)
    h.pwrite(b"after!", 0)
    h.flush()
    assert h.pread(6, 0) == b"after!"
    h.shutdown()
