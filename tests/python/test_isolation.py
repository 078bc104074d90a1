"""Isolation between images, backends and vdisk modes: no client reads bytes of another
image, writes past a lock, or gets an image under two modes (issue 12, items 1-4)."""

import os
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, random_image, sha256

MIB = 1 << 20


def cli_for(server):
    def cli(*args, ok=True):
        out = subprocess.run([BINARY, "--config", str(server.config), *args], capture_output=True, text=True,
                             timeout=60)
        if ok is not None:
            assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out
    return cli


def copy_sha(uri, tmp_path):
    out = tmp_path / f"copy-{time.monotonic_ns()}.raw"
    subprocess.run(["nbdcopy", uri, str(out)], check=True)
    digest = sha256(out)
    out.unlink()
    return digest


def same_looking_images(a, b, size, seeds):
    """Two images of one size and one mtime, different bytes: equal (name, size,
    generation) to a cache that keys by them."""
    random_image(a, size, seed=seeds[0])
    random_image(b, size, seed=seeds[1])
    stamp = 1_700_000_000_000_000_000
    os.utime(a, ns=(stamp, stamp))
    os.utime(b, ns=(stamp, stamp))


def test_two_file_backends_with_an_image_of_one_name_never_share_cached_blocks(make_server, tmp_path):
    s = make_server('[backends.a]\nkind = "file"\nroot = "a"\n[backends.b]\nkind = "file"\nroot = "b"\n'
                    '[cache.ram]\ncapacity = "256MiB"\n', start=False, demo=False)
    for folder in ("a", "b"):
        (s.data_dir / folder).mkdir()
    a, b = s.data_dir / "a" / "win11.img", s.data_dir / "b" / "win11.img"
    same_looking_images(a, b, 8 * MIB, (11, 12))
    s.start()
    assert copy_sha(s.uri("a/win11"), tmp_path) == sha256(a)
    # Cached now: b's copy must still be b's bytes.
    assert copy_sha(s.uri("b/win11"), tmp_path) == sha256(b)
    assert copy_sha(s.uri("a/win11"), tmp_path) == sha256(a)


def test_two_block_backends_with_a_lun_of_one_name_never_share_cached_blocks(make_server, tmp_path):
    luns = tmp_path / "luns"
    luns.mkdir()
    a, b = luns / "lun-a", luns / "lun-b"
    same_looking_images(a, b, 4 * MIB, (13, 14))
    s = make_server(f'[backends.san1]\nkind = "block"\ndevices = {{ lab = "{a}" }}\n'
                    f'[backends.san2]\nkind = "block"\ndevices = {{ lab = "{b}" }}\n', demo=False)
    assert copy_sha(s.uri("san1/lab"), tmp_path) == sha256(a)
    assert copy_sha(s.uri("san2/lab"), tmp_path) == sha256(b)
    assert copy_sha(s.uri("san1/lab"), tmp_path) == sha256(a)


def writable_lab(make_server, extra=""):
    """A writable file backend on loopback (plain names on by default) with a private
    vdisk devbox on image dev, and one client."""
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    '[sessions]\nreconcile_interval = "200ms"\n' + extra, start=False, demo=False)
    random_image(s.images / "dev.img", 4 * MIB, seed=21)
    s.start()
    cli = cli_for(s)
    cli("vdisk", "add", "devbox", "--backend", "images", "--key", "dev", "--mode", "private")
    cli("client", "add", "aa:bb:cc:00:00:71")
    cli("client", "assign", "aa:bb:cc:00:00:71", "devbox")
    s.cli = cli
    return s


def server_message(uri):
    out = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, env={**os.environ, "LIBNBD_DEBUG": "1"})
    assert out.returncode != 0, out.stdout
    return next(line.split("server error message:", 1)[1].strip()
                for line in out.stderr.splitlines() if "server error message:" in line)


def test_plain_names_are_read_only_on_a_writable_backend(make_server):
    s = writable_lab(make_server)
    before = sha256(s.images / "dev.img")
    h = nbd.NBD()
    h.connect_uri(s.uri("dev"))
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.set_strict_mode(0)
        h.pwrite(b"INTRUDER", 0)
    h.shutdown()
    assert sha256(s.images / "dev.img") == before


def test_plain_names_never_serve_an_image_a_private_session_writes(make_server):
    s = writable_lab(make_server)
    reader = nbd.NBD()
    reader.connect_uri(s.uri("dev"))
    reader.pread(4096, 0)
    owner = nbd.NBD()
    owner.connect_uri(s.cli("session", "open", "aa:bb:cc:00:00:71", "devbox").stdout.strip())
    owner.pwrite(b"OWNER", 0)
    owner.flush()
    # The reader that was there before is ended, and nobody gets in by the plain name.
    with pytest.raises(nbd.Error):
        for _ in range(100):
            reader.pread(4096, 0)
            time.sleep(0.05)
    message = server_message(s.uri("dev"))
    assert 'private vdisk "devbox"' in message and "writes this image" in message, message
    listing = subprocess.run(["nbdinfo", "--list", "--json", s.uri()], check=True, capture_output=True, text=True)
    import json
    assert "dev" not in [e["export-name"] for e in json.loads(listing.stdout)["exports"]], "not listed either"
    assert "writes this image" in server_message(s.uri("images/dev"))
    assert owner.pread(5, 0) == b"OWNER"
    owner.shutdown()


def test_a_name_two_backends_hold_stays_qualified_while_one_is_hidden(make_server):
    """While a private session writes images/dev, more/dev (another file of the same name)
    is still listed as more/dev: the bare name would be refused as ambiguous."""
    s = writable_lab(make_server, '[backends.more]\nkind = "file"\nroot = "more"\n')
    random_image(s.data_dir / "more" / "dev.img", 2 * MIB, seed=22)
    owner = nbd.NBD()
    owner.connect_uri(s.cli("session", "open", "aa:bb:cc:00:00:71", "devbox").stdout.strip())
    owner.pwrite(b"OWNER", 0)
    owner.flush()
    listing = subprocess.run(["nbdinfo", "--list", "--json", s.uri()], check=True, capture_output=True, text=True)
    import json
    names = [e["export-name"] for e in json.loads(listing.stdout)["exports"]]
    assert "more/dev" in names and "dev" not in names and "images/dev" not in names, names
    size = subprocess.run(["nbdinfo", "--size", s.uri("more/dev")], check=True, capture_output=True, text=True)
    assert size.stdout.strip() == str(2 * MIB)
    owner.shutdown()


def test_an_export_never_writes_over_a_vdisk_image(make_server, tmp_path):
    """`vdisk export --force` to a vdisk's own image (or another's), by its path, a
    symlink or a hard link, is refused and changes nothing."""
    s = writable_lab(make_server)
    random_image(s.images / "other.img", 1 * MIB, seed=23)
    s.cli("vdisk", "add", "otherbox", "--backend", "images", "--key", "other")
    image = s.images / "dev.img"
    before = sha256(image)
    (tmp_path / "link.img").symlink_to(image)

    def refused(vdisk, target):
        return s.cli("vdisk", "export", vdisk, str(target), "--force", "--quiet", ok=False).stderr

    for vdisk, target in (("devbox", image), ("otherbox", image), ("devbox", tmp_path / "link.img")):
        assert 'is the image of vdisk "devbox"' in refused(vdisk, target)
    os.link(image, tmp_path / "hard.img")
    assert "has 2 hard links" in refused("otherbox", tmp_path / "hard.img")
    assert sha256(image) == before and image.stat().st_size == 4 * MIB
    os.unlink(tmp_path / "hard.img")
    s.cli("vdisk", "export", "devbox", str(tmp_path / "copy.img"), "--quiet")
    assert sha256(tmp_path / "copy.img") == before


def test_one_image_is_never_registered_under_two_modes(make_server, tmp_path):
    s = make_server('[backends.a]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    f'[backends.b]\nkind = "file"\nroot = "{tmp_path / "alias"}"\n', start=False, demo=False)
    os.symlink(s.images, tmp_path / "alias")
    random_image(s.images / "dev.img", MIB, seed=22)
    random_image(s.images / "lab.img", MIB, seed=23)
    s.start()
    cli = cli_for(s)
    cli("vdisk", "add", "devbox", "--backend", "a", "--key", "dev", "--mode", "private")
    # Another name for the same folder (b reaches images/ through a symlink) does not get around it.
    err = cli("vdisk", "add", "kiosk", "--backend", "b", "--key", "dev", ok=False).stderr
    assert 'the same image as private vdisk "devbox"' in err, err
    cli("vdisk", "add", "lab", "--backend", "b", "--key", "lab")
    err = cli("vdisk", "add", "lab-dev", "--backend", "a", "--key", "lab", "--mode", "private", ok=False).stderr
    assert 'the same image as standard vdisk "lab"' in err, err
    cli("vdisk", "add", "lab2", "--backend", "a", "--key", "lab")
    err = cli("vdisk", "set", "lab2", "--mode", "private", ok=False).stderr
    assert 'the same image as standard vdisk "lab"' in err, err
    raw = tmp_path / "dev.raw"
    random_image(raw, MIB, seed=24)
    err = cli("vdisk", "import", str(raw), "copy", "--backend", "b", "--key", "dev", "--replace", ok=False).stderr
    assert 'private vdisk "devbox"' in err, err


def test_a_standard_session_is_refused_while_a_private_one_writes_its_image(make_server, tmp_path):
    """A registration the catalog could not check (a backend later reconfigured onto the
    same folder) still never mixes a private writer's blocks with a standard reader's."""
    other = tmp_path / "other"
    other.mkdir()
    s = make_server('[backends.a]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    f'[backends.b]\nkind = "file"\nroot = "{other}"\n'
                    '[sessions]\nreconcile_interval = "200ms"\n', start=False, demo=False)
    random_image(s.images / "dev.img", MIB, seed=25)
    random_image(other / "dev.img", MIB, seed=26)
    s.start()
    cli = cli_for(s)
    cli("vdisk", "add", "devbox", "--backend", "a", "--key", "dev", "--mode", "private")
    cli("vdisk", "add", "kiosk", "--backend", "b", "--key", "dev")
    for mac in ("aa:bb:cc:00:00:72", "aa:bb:cc:00:00:73"):
        cli("client", "add", mac)
    cli("client", "assign", "aa:bb:cc:00:00:72", "devbox")
    cli("client", "assign", "aa:bb:cc:00:00:73", "kiosk")
    s.stop()
    # Backend b now points at the same folder as a.
    s.config.write_text(s.config.read_text().replace(f'root = "{other}"', 'root = "images"'))
    s.start()
    assert "this server names the vdisk's image differently than the catalog recorded" in s.log.read_text()
    owner = nbd.NBD()
    owner.connect_uri(cli("session", "open", "aa:bb:cc:00:00:72", "devbox").stdout.strip())
    owner.pwrite(b"PRIVATE", 0)
    owner.flush()
    message = server_message(cli("session", "open", "aa:bb:cc:00:00:73", "kiosk").stdout.strip())
    assert 'being written by private vdisk "devbox"' in message, message
    owner.shutdown()


def test_a_hard_linked_image_is_never_written(make_server):
    """Another name for the same file (a hard link) would reach a private vdisk's bytes
    without its lock: such a file is never opened for writing."""
    s = writable_lab(make_server)
    os.link(s.images / "dev.img", s.images / "devhl.img")
    # Refused when registered as private (by add or by set), not at the client's connect.
    refused = s.cli("vdisk", "add", "devhl", "--backend", "images", "--mode", "private", ok=False).stderr
    assert 'vdisk "devhl" cannot be private' in refused and "has 2 hard links" in refused, refused
    assert "devhl" not in s.cli("vdisk", "list").stdout
    # A private vdisk whose file got a second name later is refused at connect.
    uri = s.cli("session", "open", "aa:bb:cc:00:00:71", "devbox").stdout.strip()
    message = server_message(uri)
    assert "has 2 hard links" in message and "never written" in message, message
    (s.images / "devhl.img").unlink()
    owner = nbd.NBD()
    owner.connect_uri(s.cli("session", "open", "aa:bb:cc:00:00:71", "devbox").stdout.strip())
    owner.pwrite(b"ONE NAME", 0)
    owner.flush()
    owner.shutdown()
