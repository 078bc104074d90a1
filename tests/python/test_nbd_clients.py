"""The NBD server against real clients: nbdinfo, nbdcopy, qemu-img, python3-libnbd."""

import json
import os
import subprocess
import threading
import time

import nbd
import pytest

from conftest import BINARY, random_image, sha256

MIB = 1 << 20


def errno_name(error):
    """libnbd's Error carries the errno name ('EINVAL'); older bindings the number."""
    return {22: "EINVAL", 1: "EPERM", 28: "ENOSPC", 2: "ENOENT"}.get(error.errno, error.errno)


def server_error_message(uri):
    """Runs nbdinfo with libnbd debugging on and returns the option error text the
    server sent (libnbd reports it only in its debug log)."""
    out = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0
    for line in out.stderr.splitlines():
        if "server error message:" in line:
            return line.split("server error message:", 1)[1].strip()
    raise AssertionError(f"no server message in: {out.stderr[-2000:]}")


def test_quickstart_list_copy_compare(server, tmp_path):
    out = subprocess.run(["nbdinfo", "--list", "--json", server.uri()], check=True,
                         capture_output=True, text=True).stdout
    exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
    assert "demo" in exports
    assert exports["demo"]["export-size"] == 64 * MIB
    assert exports["demo"]["is_read_only"] is True
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", server.uri("demo"), str(copy)], check=True)
    assert sha256(copy) == sha256(server.images / "demo.img")
    subprocess.run(["qemu-img", "compare", server.uri("demo"), str(server.images / "demo.img")], check=True)


def test_nbdcopy_sparse_random_image_byte_exact(make_server, tmp_path):
    s = make_server(start=False, demo=False)
    image = s.images / "disk.img"
    random_image(image, 40 * MIB + 12345, seed=1, holes=[(4 * MIB, 8 * MIB), (30 * MIB, MIB)])
    s.start()
    for conns in ("1", "4"):
        copy = tmp_path / f"copy{conns}.img"
        subprocess.run(["nbdcopy", f"--connections={conns}", s.uri("disk"), str(copy)], check=True)
        assert sha256(copy) == sha256(image)


def connect(uri, structured=True, meta=True, strict=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def test_opt_info_fields(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(server.uri("demo"))
    h.opt_info()
    assert h.get_size() == 64 * MIB
    assert h.get_canonical_export_name() == "demo"
    assert "file backend" in h.get_export_description()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB
    assert h.is_read_only() and h.can_multi_conn() and h.can_cache()
    assert not h.can_trim() and not h.can_flush() and not h.can_zero()
    # An unknown export is refused during negotiation and the handle can still GO elsewhere.
    h.set_export_name("no-such-export")
    with pytest.raises(nbd.Error) as err:
        h.opt_info()
    assert errno_name(err.value) == "ENOENT"
    assert server_error_message(server.uri("no-such-export")) == 'not found: no export named "no-such-export" (op: open_export)'
    h.set_export_name("demo")
    h.opt_go()
    assert len(h.pread(4096, 0)) == 4096
    h.shutdown()


def test_structured_reads_block_status_and_simple_mode(make_server):
    s = make_server(start=False, demo=False)
    image = s.images / "sparse.img"
    random_image(image, 16 * MIB, seed=2, holes=[(4 * MIB, 4 * MIB)])
    s.start()
    data = image.read_bytes()
    h = connect(s.uri("sparse"))
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.pread(100_000, 3 * MIB + 7) == data[3 * MIB + 7:3 * MIB + 7 + 100_000]
    extents = []

    def collect(metacontext, offset, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        extents.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(16 * MIB, 0, collect)
    position, hole_bytes = 0, 0
    for length, flags in extents:
        if flags & nbd.STATE_HOLE:
            assert flags & nbd.STATE_ZERO
            assert position >= 4 * MIB and position + length <= 8 * MIB
            hole_bytes += length
        position += length
    assert position == 16 * MIB and hole_bytes == 4 * MIB, extents
    h.shutdown()
    # Without structured replies: simple replies, same bytes.
    h = connect(s.uri("sparse"), structured=False, meta=False)
    assert not h.get_structured_replies_negotiated()
    assert h.pread(65536, 5 * MIB - 100) == data[5 * MIB - 100:5 * MIB - 100 + 65536]
    h.shutdown()


def test_out_of_range_and_oversized_reads_fail_and_connection_survives(server):
    data = (server.images / "demo.img").read_bytes()
    for structured in (True, False):
        h = connect(server.uri("demo"), structured=structured, strict=False)
        with pytest.raises(nbd.Error) as err:
            h.pread(4096, 64 * MIB - 1024)
        assert errno_name(err.value) == "EINVAL"
        with pytest.raises(nbd.Error) as err:
            h.pread(64 * MIB, 0)  # larger than the advertised maximum
        assert errno_name(err.value) == "EINVAL"
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"x" * 512, 0)  # read-only export
        assert errno_name(err.value) == "EPERM"
        assert h.pread(4096, 8192) == data[8192:12288]
        assert h.pread(0, 4096) == b"", "a zero-length read succeeds (NONE chunk when structured)"
        assert h.pread(4096, 8192) == data[8192:12288]
        h.shutdown()


def test_eight_concurrent_connections_read_their_regions(server):
    data = (server.images / "demo.img").read_bytes()
    failures = []

    def reader(i):
        try:
            h = connect(server.uri("demo"))
            base = i * 8 * MIB
            for k in range(16):
                off = base + k * 512 * 1024 + i * 17
                if h.pread(100_000, off) != data[off:off + 100_000]:
                    failures.append((i, k))
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append((i, repr(e)))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_many_requests_in_flight_on_one_connection(server):
    data = (server.images / "demo.img").read_bytes()
    h = connect(server.uri("demo"))
    buffers = []
    for i in range(256):
        buf = nbd.Buffer(4096 + i)
        offset = (i * 7919 * 4096) % (60 * MIB)
        h.aio_pread(buf, offset)
        buffers.append((buf, offset))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for buf, offset in buffers:
        assert buf.to_bytearray() == data[offset:offset + len(buf.to_bytearray())]
    h.shutdown()


def test_a_private_vdisk_supports_every_write_command(make_server):
    s = make_server("[backends.rw]\nkind = \"file\"\nroot = \"images\"\nwritable = true\n", start=False, demo=False)
    image = s.images / "rw.img"
    random_image(image, 8 * MIB, seed=3)
    s.start()
    # Plain names are read-only even on a writable backend.
    plain = connect(s.uri("rw"))
    assert plain.is_read_only()
    plain.shutdown()

    cli = s.cli
    cli("vdisk", "add", "rw", "--backend", "rw", "--mode", "private")
    cli("client", "add", "aa:bb:cc:00:00:41")
    cli("client", "assign", "aa:bb:cc:00:00:41", "rw")
    h = connect(cli("session", "open", "aa:bb:cc:00:00:41", "rw"))
    assert not h.is_read_only()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_cache()
    h.pwrite(b"A" * 10000, 4096)
    h.pwrite(b"B" * 512, 1 * MIB, nbd.CMD_FLAG_FUA)
    h.zero(65536, 2 * MIB)
    h.zero(65536, 3 * MIB, nbd.CMD_FLAG_NO_HOLE)
    h.trim(MIB, 6 * MIB)
    h.cache(MIB, 0)
    h.flush()
    assert h.pread(10000, 4096) == b"A" * 10000
    assert h.pread(512, MIB) == b"B" * 512
    assert h.pread(65536, 2 * MIB) == bytes(65536)
    with pytest.raises(nbd.Error) as err:
        h.set_strict_mode(0)
        h.pwrite(b"x" * 4096, 8 * MIB - 100)
    assert errno_name(err.value) == "ENOSPC"
    h.shutdown()
    on_disk = image.read_bytes()
    assert on_disk[4096:14096] == b"A" * 10000
    assert on_disk[MIB:MIB + 512] == b"B" * 512
    assert on_disk[2 * MIB:2 * MIB + 65536] == bytes(65536)


@pytest.mark.parametrize("cpu_local", ["true", "false"])
def test_connections_on_their_cpu_or_the_shared_pool_serve_alike(make_server, cpu_local):
    """With cpu_local (the default), a TCP connection moves to its CPU's runtime after the
    handshake, taking any request the client sent early along; without, it stays on the
    shared pool. Either way: a pipelined first request, many requests in flight, writes
    of a session, and a session replaced while its connection idles before any request."""
    s = make_server(f'[nbd]\nlisten = ["127.0.0.1:PORT"]\ncpu_local = {cpu_local}\n')

    cli = s.cli
    cli("vdisk", "add", "std", "--backend", "images", "--key", "demo")
    cli("client", "add", "aa:bb:cc:00:00:51")
    cli("client", "assign", "aa:bb:cc:00:00:51", "std")
    uri = cli("session", "open", "aa:bb:cc:00:00:51", "std")
    h = connect(uri)
    # Requests sent together right after the handshake, before any reply.
    for i in range(16):
        h.aio_pwrite(bytes([i]) * 65536, i * 65536)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(16):
        assert h.pread(65536, i * 65536) == bytes([i]) * 65536
    h.shutdown()
    # A connection that attached and sent nothing yet ends when its session is replaced.
    idle = connect(uri)
    cli("session", "open", "aa:bb:cc:00:00:51", "std")
    with pytest.raises(nbd.Error):
        for _ in range(100):
            idle.pread(512, 0)
            time.sleep(0.1)


def test_unix_socket_listener(make_server, tmp_path):
    sock = tmp_path / "nbd.sock"
    s = make_server(f'[nbd]\nlisten = ["unix:{sock}"]\n')
    out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///demo?socket={sock}"], check=True,
                         capture_output=True, text=True).stdout
    assert int(out) == 64 * MIB
    assert s.stop() == 0
    assert not os.path.exists(sock), "socket file removed on shutdown"


def test_base_exports_off_refuses_plain_names(make_server):
    s = make_server("[nbd]\nbase_exports = false\nlisten = [\"127.0.0.1:PORT\"]\n", start=False)
    s.start()
    assert "plain image names are off" in server_error_message(s.uri("demo"))
    listing = subprocess.run(["nbdinfo", "--list", "--json", s.uri()], check=True, capture_output=True, text=True)
    assert json.loads(listing.stdout)["exports"] == []
    assert "refused" in s.log.read_text()


def test_default_export_serves_the_empty_name(make_server):
    s = make_server("[nbd]\ndefault_export = \"demo\"\nlisten = [\"127.0.0.1:PORT\"]\n", start=False)
    s.start()
    out = subprocess.run(["nbdinfo", "--size", s.uri()], check=True, capture_output=True, text=True).stdout
    assert int(out) == 64 * MIB
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.connect_uri(s.uri())
    h.opt_info()
    assert h.get_canonical_export_name() == "demo", "NBD_INFO_NAME reports the canonical name"
    h.opt_abort()
