"""The S3 backend end to end, against a real S3-compatible server (s3rver, from npm) on
loopback: import/export round trips, qcow2 conversion, a private vdisk on a chunked
image, and reads that stay byte-exact while a proxy injects errors and stalls."""

import os
import shutil
import signal
import subprocess

import nbd
import pytest

from conftest import BINARY, BUCKET, backend_toml, free_port, random_image, sha256, wait_port
from faultproxy import FaultyProxy, every_eleventh

MIB = 1 << 20


def cli_for(s):
    def cli(*args, ok=True):
        out = subprocess.run([BINARY, "--config", str(s.config), *args], capture_output=True, text=True, timeout=300)
        if ok is not None:
            assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
            if not ok:
                assert out.returncode == 2, out.stderr
        return out
    return cli


def test_import_serve_and_export_round_trip_byte_exact(make_server, tmp_path, s3):
    s = make_server(backend_toml("bucket", s3, 'part_size = "5MiB"'), start=False, demo=False)
    cli = cli_for(s)
    raw = tmp_path / "os.raw"
    random_image(raw, 24 * MIB + 4096, seed=21, holes=[(4 * MIB, 3 * MIB)])

    out = cli("vdisk", "import", str(raw), "os", "--backend", "bucket", "--description", "from S3")
    assert f"sha256 {sha256(raw)} verified" in out.stderr, out.stderr
    assert "upload" in out.stderr and "verify" in out.stderr
    assert "os" in cli("vdisk", "list").stdout

    # Importing again is refused, in the catalog and on the backend.
    assert "exists already" in cli("vdisk", "import", str(raw), "os", "--backend", "bucket", ok=False).stderr
    assert "already has an image" in cli("vdisk", "import", str(raw), "os2", "--backend", "bucket", "--key", "os",
                                         ok=False).stderr

    s.start()
    copy = tmp_path / "copy.raw"
    subprocess.run(["nbdcopy", s.uri("os"), str(copy)], check=True)
    assert sha256(copy) == sha256(raw)
    subprocess.run(["qemu-img", "compare", s.uri("os"), str(raw)], check=True)

    exported = tmp_path / "exported.raw"
    out = cli("vdisk", "export", "os", str(exported))
    assert sha256(exported) == sha256(raw)
    assert sha256(raw) in out.stdout
    # The hole stays a hole.
    assert os.stat(exported).st_blocks * 512 <= os.path.getsize(exported) - 3 * MIB
    assert "--force" in cli("vdisk", "export", "os", str(exported), ok=False).stderr
    # A qcow2 export, by extension: qemu-img sees the same disk.
    qcow2 = tmp_path / "exported.qcow2"
    out = cli("vdisk", "export", "os", str(qcow2))
    assert "(qcow2)" in out.stdout and sha256(raw) in out.stdout
    assert subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)], capture_output=True,
                          text=True, check=True).stdout.count('"format": "qcow2"') == 1
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)], check=True)
    assert not [p for p in os.listdir(tmp_path) if ".export-" in p], "the raw temporary is removed"
    assert "[possible values: raw, qcow2]" in cli("vdisk", "export", "os", str(tmp_path / "x.vmdk"), "--format", "vmdk",
                                     ok=False).stderr

    # --replace uploads a new image and updates the vdisk's size.
    random_image(raw, 3 * MIB, seed=22)
    cli("vdisk", "import", str(raw), "os", "--backend", "bucket", "--replace")
    assert '"size": 3145728' in cli("--json", "vdisk", "show", "os").stdout


def test_a_qcow2_image_is_converted_on_import(make_server, tmp_path, s3, monkeypatch):
    # Credentials from the usual AWS variables instead of the configuration.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
    s = make_server(backend_toml("bucket", s3, keys=False), start=False, demo=False)
    cli = cli_for(s)
    raw = tmp_path / "disk.raw"
    random_image(raw, 6 * MIB, seed=23, holes=[(MIB, MIB)])
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True)
    out = cli("vdisk", "import", str(qcow2), "q", "--backend", "bucket")
    assert "is a qcow2 image: converting it to raw" in out.stderr
    assert f"sha256 {sha256(raw)} verified" in out.stderr
    assert not [p for p in os.listdir(s.data_dir) if p.startswith(".import-")], "the converted copy is removed"
    # An image with a backing file is refused: converting it would read that file.
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(qcow2), str(overlay)],
                   check=True, capture_output=True)
    assert "has a backing file" in cli("vdisk", "import", str(overlay), "o", "--backend", "bucket", ok=False).stderr
    # A typo in an option is caught before anything is uploaded.
    assert "write" in cli("vdisk", "import", str(raw), "t", "--backend", "bucket", "--write-cache", "ramm",
                          ok=False).stderr
    assert "t" not in [line.split()[0] for line in cli("vdisk", "list").stdout.splitlines()[1:]]
    s.start()
    subprocess.run(["qemu-img", "compare", s.uri("q"), str(raw)], check=True)
    # The typo'd import stored nothing, so the same import with the right option works.
    cli("vdisk", "import", str(raw), "t", "--backend", "bucket")


def test_a_private_vdisk_on_a_chunked_image_keeps_flushed_writes(make_server, tmp_path, s3):
    s = make_server(backend_toml("bucket", s3, 'layout = "chunked"\nchunk_size = "256KiB"\nwritable = true')
                    + '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    cli = cli_for(s)
    raw = tmp_path / "dev.raw"
    random_image(raw, 8 * MIB, seed=24)
    cli("vdisk", "import", str(raw), "dev", "--backend", "bucket", "--mode", "private")
    cli("client", "add", "aa:bb:cc:00:00:09")
    cli("client", "assign", "aa:bb:cc:00:00:09", "dev")
    s.start()
    uri = cli("session", "open", "aa:bb:cc:00:00:09", "dev").stdout.strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    assert not h.is_read_only()
    h.pwrite(b"written to S3" * 100, 256 * 1024 - 300)  # across a chunk boundary
    h.flush()
    # The image of a vdisk in use is not replaced under its client.
    assert "live session" in cli("vdisk", "import", str(raw), "dev", "--backend", "bucket", "--mode", "private",
                                 "--replace", ok=False).stderr
    h.shutdown()
    s.stop()

    # A fresh server (nothing in memory) exports what the client flushed.
    s.start()
    exported = tmp_path / "after.raw"
    cli("vdisk", "export", "dev", str(exported))
    data = bytearray(open(raw, "rb").read())
    data[256 * 1024 - 300:256 * 1024 - 300 + 1300] = b"written to S3" * 100
    assert sha256(exported) == sha256(bytes(data))


def test_reads_stay_byte_exact_through_errors_and_stalls(make_server, tmp_path, s3):
    proxy = FaultyProxy(s3, stall=3, choose=every_eleventh)
    try:
        s = make_server(backend_toml("direct", s3) + backend_toml("faulty", proxy.port, 'timeout = "1s"\nretries = 6')
                        + '[cache.ram]\nenabled = false\n', start=False, demo=False)
        cli = cli_for(s)
        raw = tmp_path / "os.raw"
        random_image(raw, 12 * MIB, seed=25)
        # Upload straight to s3rver; the server reads the same objects through the proxy.
        cli("vdisk", "import", str(raw), "os", "--backend", "direct")
        s.start()
        # Both backends list the image, so its exports are "direct/os" and "faulty/os".
        for request_size in (1 << 20, 64 << 10):
            copy = tmp_path / f"copy-{request_size}.raw"
            subprocess.run(["nbdcopy", f"--request-size={request_size}", s.uri("faulty/os"), str(copy)],
                           check=True, timeout=300)
            assert sha256(copy) == sha256(raw), request_size
        assert all(proxy.injected.values()), proxy.injected
        assert s.alive()
    finally:
        proxy.close()


def test_s3_configuration_mistakes_are_explained(tmp_path, s3):
    data = tmp_path / "data"
    raw = tmp_path / "disk.raw"
    random_image(raw, MIB, seed=26)

    def run(backend, *args):
        config = tmp_path / "c.toml"
        config.write_text(f'data_dir = "{data}"\n[demo]\ncreate = false\n{backend}')
        subprocess.run([BINARY, "--config", str(config), "init"], capture_output=True, timeout=60)
        return subprocess.run([BINARY, "--config", str(config), *args], capture_output=True, text=True, timeout=120)

    # Plain http without allow_http: the key to set is named.
    toml = backend_toml("bucket", s3).replace("allow_http = true\n", "")
    out = run(toml, "vdisk", "import", str(raw), "d", "--backend", "bucket")
    assert out.returncode == 2 and "set allow_http = true" in out.stderr, out.stderr
    # A bucket that does not exist.
    toml = backend_toml("bucket", s3).replace(f'bucket = "{BUCKET}"', 'bucket = "nope"')
    out = run(toml, "vdisk", "import", str(raw), "d", "--backend", "bucket")
    assert out.returncode == 2 and "the bucket does not exist" in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("osstream: not found:"), "one line: " + out.stderr
    # Nothing listening: the cause is in the message.
    toml = backend_toml("bucket", free_port(), "retries = 0\ntimeout = \"2s\"")
    out = run(toml, "vdisk", "import", str(raw), "d", "--backend", "bucket")
    assert out.returncode == 2 and "Connection refused" in out.stderr, out.stderr
    # A private vdisk on the one-object layout is refused before anything is uploaded.
    toml = backend_toml("bucket", s3, "writable = true")
    out = run(toml, "vdisk", "import", str(raw), "p", "--backend", "bucket", "--mode", "private")
    assert out.returncode == 2 and 'layout = "chunked"' in out.stderr, out.stderr
    out = run(toml, "vdisk", "import", str(raw), "p", "--backend", "bucket")
    assert out.returncode == 0, "nothing was left behind by the refused import: " + out.stderr
    # config show hides the secret.
    out = run(toml, "config", "show")
    assert out.returncode == 0 and "S3RVER" in out.stdout.replace('secret_access_key = "<redacted>"', "")
    assert 'secret_access_key = "<redacted>"' in out.stdout, out.stdout


def test_ctrl_c_stops_an_import_and_stores_nothing(make_server, tmp_path, s3):
    s = make_server(backend_toml("bucket", s3, 'part_size = "5MiB"\nconcurrency = 1'), start=False, demo=False)
    raw = tmp_path / "big.raw"
    random_image(raw, 160 * MIB, seed=27)
    proc = subprocess.Popen([BINARY, "--config", str(s.config), "vdisk", "import", str(raw), "big", "--backend", "bucket"],
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("upload: 25%"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 2, "".join(seen) + rest
    assert "interrupted: stopping the import" in rest and "import interrupted" in rest, rest
    cli = cli_for(s)
    assert "big" not in cli("vdisk", "list").stdout
    # Nothing half-stored: the same import without --replace goes through.
    random_image(raw, 6 * MIB, seed=28)
    cli("vdisk", "import", str(raw), "big", "--backend", "bucket")


def test_quick_reconnects_of_a_private_chunked_vdisk_lose_no_flushed_write(make_server, tmp_path, s3):
    """A client that reconnects at once and writes again (a boot's next stage) while its
    previous connection's source is still going away: every flushed write stays."""
    s = make_server(backend_toml("bucket", s3, 'layout = "chunked"\nwritable = true')
                    + '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    cli = cli_for(s)
    raw = tmp_path / "pv.raw"
    random_image(raw, 8 * MIB, seed=33)
    cli("vdisk", "import", str(raw), "pv", "--backend", "bucket", "--mode", "private", "--quiet")
    cli("client", "add", "aa:bb:cc:00:00:0a")
    cli("client", "assign", "aa:bb:cc:00:00:0a", "pv")
    s.start()
    uri = cli("session", "open", "aa:bb:cc:00:00:0a", "pv").stdout.strip()
    expected = bytearray(raw.read_bytes())
    for i in range(7):
        offset = (i + 1) * MIB
        for at, data in ((offset, b"FLSH%04d" % i), (offset + 4096, b"SECONDW!")):
            h = nbd.NBD()
            h.connect_uri(uri)
            h.pwrite(data, at)
            h.flush()
            h.shutdown()
            expected[at:at + 8] = data
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.pread(8, offset) == b"FLSH%04d" % i and h.pread(8, offset + 4096) == b"SECONDW!", i
        h.shutdown()
    out = tmp_path / "pv-out.raw"
    cli("vdisk", "export", "pv", str(out), "--quiet")
    assert sha256(out) == sha256(bytes(expected))
