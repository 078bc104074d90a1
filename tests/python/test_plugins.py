"""Backend plugins served over NBD: the C example, the Rust chunk store, and a plugin that
panics for one client while the server keeps serving the others."""

import os
import subprocess
import threading

import nbd
import pytest

from conftest import BINARY, ROOT, TARGET, random_image, sha256

MIB = 1 << 20
C_SOURCE = os.path.join(ROOT, "plugins", "examples", "c-rawfile", "rawfile.c")
HEADERS = os.path.join(ROOT, "plugins", "abi", "include")


def build_c_plugin(out_dir, *defines):
    out = os.path.join(out_dir, "librawfile.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-I", HEADERS, "-o", out, C_SOURCE,
                    *[f"-D{d}" for d in defines]], check=True)
    return out


def rust_plugin(name):
    path = os.path.join(TARGET, "debug", f"lib{name}.so")
    assert os.path.exists(path), f"{path} missing: run cargo build --workspace"
    return os.path.realpath(path)


def test_c_plugin_streams_byte_exact_beside_the_file_backend(make_server, tmp_path):
    lib = build_c_plugin(str(tmp_path))
    s = make_server(start=False, demo=False)
    image = s.images / "disk.img"
    random_image(image, 24 * MIB + 777, seed=5, holes=[(2 * MIB, 3 * MIB)])
    s.config.write_text(s.config.read_text() + f'''
[backends.images]
kind = "file"
root = "images"

[backends.vendor]
kind = "plugin"
path = "{lib}"
config = {{ root = "{s.images}" }}
''')
    s.start()
    listing = subprocess.run(["nbdinfo", "--list", s.uri()], check=True, capture_output=True, text=True).stdout
    # The same image on two backends: listed by qualified names.
    assert "images/disk" in listing and "vendor/disk" in listing and "plugin backend 'vendor'" in listing
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", s.uri("vendor/disk"), str(copy)], check=True)
    assert sha256(copy) == sha256(image)
    subprocess.run(["qemu-img", "compare", s.uri("vendor/disk"), s.uri("images/disk")], check=True)
    assert "plugin loaded" in s.log.read_text() and "rawfile serving" in s.log.read_text()


def test_rust_chunkstore_streams_byte_exact(make_server, tmp_path):
    raw = tmp_path / "os.raw"
    random_image(raw, 20 * MIB + 4321, seed=6, holes=[(MIB, 4 * MIB)])
    store = tmp_path / "store"
    packer = os.path.join(TARGET, "debug", "osstream-chunkstore-pack")
    out = subprocess.run([packer, str(raw), str(store), "os"], check=True, capture_output=True, text=True)
    assert "zero" in out.stdout
    s = make_server(f'''
[backends.chunks]
kind = "plugin"
path = "{rust_plugin("osstream_example_chunkstore")}"
config = {{ root = "{store}", cached_chunks = 4 }}
''', demo=False)
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", "--connections=4", s.uri("os"), str(copy)], check=True)
    assert sha256(copy) == sha256(raw)


def test_a_panicking_plugin_fails_that_read_and_serves_everyone_else(make_server):
    s = make_server(f'''
[backends.faulty]
kind = "plugin"
path = "{rust_plugin("osstream_example_faulty")}"
config = {{ size = {16 * MIB}, panic_at = {8 * MIB} }}
''', demo=False)
    h = nbd.NBD()
    h.connect_uri(s.uri("pattern"))
    with pytest.raises(nbd.Error) as err:
        h.pread(4096, 8 * MIB)
    assert err.value.errno in ("EIO", 5)
    expected = bytes(((i // 4096 + i) & 0xFF) for i in range(4096))
    assert h.pread(4096, 0) == expected  # the same connection still works

    failures = []

    def other_client():
        try:
            other = nbd.NBD()
            other.connect_uri(s.uri("pattern"))
            for _ in range(20):
                assert other.pread(4096, 0) == expected
            other.shutdown()
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=other_client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert s.alive()
    assert "plugin panicked: asked to panic" in s.log.read_text()
    h.shutdown()


def test_a_plugin_of_another_major_version_stops_start_up(tmp_path):
    lib = build_c_plugin(str(tmp_path), "OSSTREAM_TEST_MAJOR=2")
    config = tmp_path / "osstream.toml"
    config.write_text(f'data_dir = "{tmp_path}/d"\n[nbd]\nlisten = ["127.0.0.1:0"]\n'
                      f'[backends.vendor]\nkind = "plugin"\npath = "{lib}"\n')
    out = subprocess.run([BINARY, "--config", str(config), "serve"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert f"plugin {lib}: built for plugin ABI 2.0" in out.stderr


def test_a_relative_plugin_path_is_refused(tmp_path):
    config = tmp_path / "osstream.toml"
    config.write_text(f'data_dir = "{tmp_path}/d"\n[nbd]\nlisten = ["127.0.0.1:0"]\n'
                      '[backends.vendor]\nkind = "plugin"\npath = "plugins/libvendor.so"\n')
    out = subprocess.run([BINARY, "--config", str(config), "serve"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "must be absolute" in out.stderr


def test_requests_arriving_during_shutdown_get_eshutdown(make_server):
    import signal
    import struct
    import time
    from test_bad_input import closed_by_server, go, greet, recv_exact, request
    s = make_server(f'''
[cache.ram]
enabled = false
[backends.faulty]
kind = "plugin"
path = "{rust_plugin("osstream_example_faulty")}"
config = {{ size = {16 * MIB}, slow_at = {8 * MIB}, slow_ms = 4000 }}
''', demo=False)
    sock = greet(s.port)
    go(sock, b"pattern")
    request(sock, 0, 8 * MIB, 4096, cookie=1)  # takes 4 s in the plugin
    time.sleep(0.3)
    s.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 3
    while "finishing requests in flight" not in s.log.read_text():
        assert time.time() < deadline, "the server did not start draining"
        time.sleep(0.05)
    time.sleep(0.2)
    request(sock, 0, 0, 4096, cookie=2)  # arrives while the server drains
    replies = {}
    for _ in range(2):
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
        replies[cookie] = error
        if error == 0:
            data = recv_exact(sock, 4096)
            assert data == bytes(((i // 4096 + i) & 0xFF) for i in range(8 * MIB, 8 * MIB + 4096))
    assert replies == {1: 0, 2: 108}, replies  # 108 = NBD_ESHUTDOWN
    assert closed_by_server(sock)
    assert s.proc.wait(timeout=20) == 0
