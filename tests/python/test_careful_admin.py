"""Things a careful admin trips on: typos that must not fail silently, secrets that must
not reach logs, addresses the CLI prints, plain names on the network, broken input files."""

import json
import os
import subprocess

import pytest

from conftest import BINARY, random_image

MIB = 1 << 20


def run(*args, config=None, timeout=60, **kw):
    prefix = [BINARY] + (["--config", str(config)] if config else [])
    return subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def lab(tmp_path):
    """A configuration with one writable file backend holding win.img, one client."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    random_image(data / "images" / "win.img", 2 * MIB, seed=3)
    config = tmp_path / "osstream.toml"

    def write(nbd='listen = ["127.0.0.1:10998"]\n'):
        config.write_text(f'data_dir = "{data}"\n[demo]\ncreate = false\n[nbd]\n{nbd}'
                          '[backends.images]\nkind = "file"\nroot = "images"\n')
    write()

    def cli(*args, ok=True):
        out = run(*args, config=config)
        if ok is not None:
            assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out

    cli("init")
    cli.config, cli.data, cli.write = config, data, write
    return cli


@pytest.mark.parametrize("flag", [["--log", "verbose"], ["--log", "infoo"], ["--log", "info,osstream=loud"]])
def test_an_invalid_log_filter_is_refused_at_start_up(lab, flag):
    out = run("serve", *flag, config=lab.config, timeout=20)
    assert out.returncode == 2, out.stderr
    assert "is not a valid filter" in out.stderr
    assert "off, error, warn, info, debug, trace" in out.stderr
    assert "info,osstream_nbd=debug" in out.stderr


def test_an_invalid_log_filter_in_the_file_is_refused_too(lab):
    lab.config.write_text(lab.config.read_text() + '[log]\nfilter = "infoo"\n')
    out = run("serve", config=lab.config, timeout=20)
    assert out.returncode == 2 and '"infoo" is not a level' in out.stderr, out.stderr


def test_output_into_a_closed_pipe_ends_quietly(lab):
    import sqlite3
    lab("vdisk", "add", "win", "--backend", "images")
    # More output than a pipe holds (64 KiB), so writing goes on after `head` is gone.
    db = sqlite3.connect(lab.data / "catalog.db")
    db.executemany("INSERT INTO clients (mac, name, hostname, client_group, notes, created_at) "
                   "VALUES (?, NULL, NULL, 'lab', 'a client with a note long enough to fill lines', 0)",
                   [(f"aa:bb:cc:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",) for i in range(3000)])
    db.commit()
    db.close()
    for args in (["--json", "client", "list"], ["client", "list"], ["--json", "vdisk", "list"]):
        shell = f"{BINARY} --config {lab.config} {' '.join(args)} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
        out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
        assert "panicked" not in out.stderr and "Broken pipe" not in out.stderr, out.stderr
        assert out.stdout.strip() in ("0", "141"), f"{args}: exit {out.stdout}"


def test_a_key_with_the_file_extension_gets_a_hint(lab, tmp_path):
    err = lab("vdisk", "add", "win", "--backend", "images", "--key", "win.img", ok=False).stderr
    assert 'has no image "win.img"; keys leave out the file extension: --key win' in err
    err = lab("vdisk", "add", "other", "--backend", "images", "--key", "ghost.img", ok=False).stderr
    assert 'has no image "ghost.img"' in err and "leave out" not in err
    raw = tmp_path / "k.raw"
    random_image(raw, MIB, seed=7)
    err = lab("vdisk", "import", str(raw), "k4", "--backend", "images", "--key", "k4.img", "--quiet", ok=False).stderr
    assert "ends in the file extension" in err and "--key k4" in err, err
    assert not (lab.data / "images" / "k4.img.img").exists()


@pytest.mark.parametrize("address", ["nbd://boot:10809", "boot lab", "boot:notaport", "boot:10809/x"])
def test_a_malformed_public_address_is_refused(lab, address):
    lab.write(f'listen = ["0.0.0.0:10810"]\npublic_address = "{address}"\n')
    err = lab("config", "show", ok=False).stderr
    assert "nbd.public_address" in err and "HOST or HOST:PORT" in err, err


def test_a_truncated_qcow2_is_refused_before_anything_is_stored(lab, tmp_path):
    raw = tmp_path / "disk.raw"
    random_image(raw, 8 * MIB, seed=4)
    good = tmp_path / "good.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(good)], check=True)
    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = lab("vdisk", "import", str(truncated), "broken", "--backend", "images", "--quiet", ok=False).stderr
    assert "is a corrupt qcow2 image" in err and "nothing was imported" in err, err
    assert not (lab.data / "images" / "broken.img").exists()
    assert not [p for p in os.listdir(lab.data) if p.startswith(".import")], "no converted leftover"
    assert "broken" not in lab("vdisk", "list").stdout
    # Cut by less than a cluster: `qemu-img check` finds no error, but the data reaches
    # past the end of the file.
    slightly = tmp_path / "slightly.qcow2"
    slightly.write_bytes(good.read_bytes()[:-1000])
    err = lab("vdisk", "import", str(slightly), "cut", "--backend", "images", "--quiet", ok=False).stderr
    assert "is a truncated qcow2 image" in err and "nothing was imported" in err, err
    assert not (lab.data / "images" / "cut.img").exists()
    # The whole file imports fine, and so does a compressed one (whose last cluster ends
    # before a whole cluster's size).
    lab("vdisk", "import", str(good), "fine", "--backend", "images", "--quiet")
    text = tmp_path / "text.raw"
    text.write_bytes(b"osstream compressible line of text 0123456789\n" * 200_000)
    compressed = tmp_path / "compressed.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(text), str(compressed)], check=True)
    lab("vdisk", "import", str(compressed), "packed", "--backend", "images", "--quiet")
    assert (lab.data / "images" / "packed.img").read_bytes()[:text.stat().st_size] == text.read_bytes()


def test_an_existing_image_is_refused_before_the_slow_conversion(lab, tmp_path):
    raw = tmp_path / "disk.raw"
    random_image(raw, MIB, seed=5)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    err = lab("vdisk", "import", str(image), "win", "--backend", "images", "--quiet", ok=False).stderr
    assert 'backend "images" already has an image "win"; pass --replace' in err
    assert "converting" not in err, "refused before converting"


def test_session_tokens_reach_the_log_only_as_a_prefix(make_server):
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    random_image(s.images / "win.img", MIB, seed=6)
    s.start()

    cli = s.cli
    cli("vdisk", "add", "win", "--backend", "images", "--write-cache", "ram")
    cli("client", "add", "aa:bb:cc:00:00:31")
    cli("client", "assign", "aa:bb:cc:00:00:31", "win")
    uri = cli("session", "open", "aa:bb:cc:00:00:31", "win")
    token = uri.rsplit("/", 1)[1]
    subprocess.run(["nbdinfo", "--size", uri], check=True, capture_output=True)
    forged = "f" * 48
    subprocess.run(["nbdinfo", "--size", uri.replace(token, forged)], capture_output=True)
    cli("client", "unassign", "aa:bb:cc:00:00:31", "win")
    subprocess.run(["nbdinfo", "--size", uri], capture_output=True)
    log = s.log.read_text()
    assert "refused" in log
    assert token not in log and forged not in log, "a token was logged in full"
    assert f"s/{token[:6]}…" in log and "s/ffffff…" in log


def test_plain_names_are_off_by_default_on_a_network_listener(make_server):
    s = make_server('[nbd]\nlisten = ["0.0.0.0:PORT"]\n')
    err = subprocess.run(["nbdinfo", s.uri("demo")], capture_output=True, text=True,
                         env={**os.environ, "LIBNBD_DEBUG": "1"}).stderr
    assert "plain image names are off on this server" in err
    assert "plain image names are off because a listener is on the network" in s.log.read_text()
    listing = subprocess.run(["nbdinfo", "--list", "--json", s.uri()], check=True, capture_output=True, text=True)
    assert json.loads(listing.stdout)["exports"] == []


def test_plain_names_forced_on_a_network_listener_are_served_with_a_warning(make_server):
    s = make_server('[nbd]\nbase_exports = true\nlisten = ["0.0.0.0:PORT"]\n')
    out = subprocess.run(["nbdinfo", "--size", s.uri("demo")], check=True, capture_output=True, text=True)
    assert int(out.stdout) == 64 * MIB
    log = s.log.read_text()
    assert "plain image names are served read-only to anyone who can reach these addresses" in log
    assert "set [nbd] public_address" in log


def open_session_with(lab, nbd):
    lab.write(nbd)
    lab("vdisk", "add", "win", "--backend", "images", ok=None)
    lab("client", "add", "aa:bb:cc:00:00:32", ok=None)
    lab("client", "assign", "aa:bb:cc:00:00:32", "win", ok=None)
    return lab("session", "open", "aa:bb:cc:00:00:32", "win")


def test_session_open_prints_the_address_clients_use(lab, tmp_path):
    out = open_session_with(lab, 'listen = ["0.0.0.0:10810"]\n')
    assert out.stdout.startswith("s/") and "nbd://" not in out.stdout, out.stdout
    assert "set [nbd] public_address" in out.stderr
    opened = json.loads(lab("--json", "session", "open", "aa:bb:cc:00:00:32", "win").stdout)
    assert opened["uri"] is None and opened["export"].startswith("s/") and "public_address" in opened["hint"]

    out = open_session_with(lab, 'listen = ["0.0.0.0:10810"]\npublic_address = "boot.lab"\n')
    assert out.stdout.startswith("nbd://boot.lab:10810/s/"), out.stdout

    out = open_session_with(lab, 'listen = ["10.9.8.7:10811"]\n')
    assert out.stdout.startswith("nbd://10.9.8.7:10811/s/"), out.stdout

    sock = tmp_path / "nbd.sock"
    out = open_session_with(lab, f'listen = ["unix:{sock}"]\n')
    assert out.stdout.startswith("nbd+unix:///s/") and out.stdout.strip().endswith(f"?socket={sock}"), out.stdout
