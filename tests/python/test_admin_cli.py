"""The admin CLI over the catalog: every error path says what is wrong, and the happy
paths print tables or JSON."""

import json
import os
import subprocess

import pytest

from conftest import BINARY, random_image

MIB = 1 << 20


@pytest.fixture
def admin(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    random_image(data / "images" / "win11.img", 4 * MIB, seed=1)
    random_image(data / "images" / "build.img", 2 * MIB, seed=2)
    config = tmp_path / "osstream.toml"
    config.write_text(f'data_dir = "{data}"\n[demo]\ncreate = false\n[nbd]\nlisten = ["127.0.0.1:10999"]\n'
                      '[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                      '[backends.readonly]\nkind = "file"\nroot = "images"\n')

    def run(*args, ok=True):
        out = subprocess.run([BINARY, "--config", str(config), *args], capture_output=True, text=True, timeout=60)
        if ok:
            assert out.returncode == 0, f"{args}: {out.stderr}"
        else:
            assert out.returncode == 2, f"{args} should fail: {out.stdout}"
        return out

    run("init")
    run.data = data
    return run


def error(run, *args):
    return run(*args, ok=False).stderr


def test_vdisk_lifecycle_and_errors(admin):
    out = admin("vdisk", "add", "win11", "--backend", "images", "--description", "Windows 11")
    assert "win11" in out.stdout and "images:win11" in out.stdout and "4.0MiB" in out.stdout
    admin("vdisk", "add", "dev", "--backend", "images", "--key", "build", "--mode", "private")
    assert 'no backend named "nas"; configured backends: images, readonly' in error(admin, "vdisk", "add", "x", "--backend", "nas")
    assert 'backend "images" has no image "ghost"' in error(admin, "vdisk", "add", "ghost", "--backend", "images")
    assert 'vdisk "win11" already exists' in error(admin, "vdisk", "add", "win11", "--backend", "images")
    assert "[possible values: standard, private]" in error(admin, "vdisk", "add", "y", "--backend", "images", "--key", "win11", "--mode", "shared")
    assert "ram, ram-overflow-disk, server-disk, server-disk-persistent" in error(
        admin, "vdisk", "add", "y", "--backend", "images", "--key", "win11", "--write-cache", "disk")
    assert "invalid vdisk name" in error(admin, "vdisk", "add", "../up", "--backend", "images", "--key", "win11")
    assert "set writable = true in [backends.readonly]" in error(
        admin, "vdisk", "add", "ro", "--backend", "readonly", "--key", "build", "--mode", "private")
    listed = json.loads(admin("--json", "vdisk", "list").stdout)
    assert [v["name"] for v in listed] == ["dev", "win11"]
    assert listed[0]["mode"] == "private" and listed[1]["size"] == 4 * MIB
    table = admin("vdisk", "list").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "IMAGE", "SIZE"]
    shown = json.loads(admin("--json", "vdisk", "set", "win11", "--write-cache", "server-disk", "--disable").stdout)
    assert shown["write_cache"] == "server-disk" and shown["enabled"] is False
    assert 'vdisk "nope" does not exist' in error(admin, "vdisk", "show", "nope")
    admin("vdisk", "rm", "dev")
    assert 'vdisk "dev" does not exist' in error(admin, "vdisk", "rm", "dev")


def test_client_lifecycle_and_errors(admin):
    admin("client", "add", "AA-BB-CC-00-00-01", "--name", "pc1", "--hostname", "lab-pc1", "--group", "lab")
    shown = json.loads(admin("--json", "client", "show", "aabbcc000001").stdout)
    assert shown["mac"] == "aa:bb:cc:00:00:01" and shown["name"] == "pc1" and shown["vdisks"] == []
    assert "invalid MAC address" in error(admin, "client", "add", "aa:bb:cc")
    assert "client aa:bb:cc:00:00:01 already exists" in error(admin, "client", "add", "aa:bb:cc:00:00:01")
    assert 'client name "pc1" is already used by aa:bb:cc:00:00:01' in error(admin, "client", "add", "aa:bb:cc:00:00:02", "--name", "pc1")
    assert 'hostname "lab-pc1" is already used' in error(admin, "client", "add", "aa:bb:cc:00:00:02", "--hostname", "lab-pc1")
    admin("client", "add", "aa:bb:cc:00:00:02", "--name", "pc2")
    updated = json.loads(admin("--json", "client", "set", "aa:bb:cc:00:00:02", "--notes", "desk 2", "--name", "").stdout)
    assert updated["notes"] == "desk 2" and updated["name"] is None
    assert "client \"ff:ff:ff:ff:ff:ff\" does not exist" in error(admin, "client", "show", "ff:ff:ff:ff:ff:ff")
    assert "MAC" in admin("client", "list").stdout.splitlines()[0]
    admin("client", "rm", "aa:bb:cc:00:00:02")
    assert len(json.loads(admin("--json", "client", "list").stdout)) == 1


def test_assignments_sessions_and_private_locks(admin):
    admin("vdisk", "add", "win11", "--backend", "images")
    admin("vdisk", "add", "dev", "--backend", "images", "--key", "build", "--mode", "private")
    admin("client", "add", "aa:bb:cc:00:00:01")
    admin("client", "add", "aa:bb:cc:00:00:02")
    assert 'cannot assign vdisk "ghost" to aa:bb:cc:00:00:01: no such vdisk' in error(admin, "client", "assign", "aa:bb:cc:00:00:01", "ghost")
    admin("client", "assign", "aa:bb:cc:00:00:01", "win11")
    admin("client", "assign", "aa:bb:cc:00:00:01", "dev", "--default")
    admin("client", "assign", "aa:bb:cc:00:00:02", "dev")
    shown = json.loads(admin("--json", "client", "show", "aa:bb:cc:00:00:01").stdout)
    assert [(a["vdisk"], a["is_default"]) for a in shown["vdisks"]] == [("win11", False), ("dev", True)]
    assert 'vdisk "win11" is not assigned to aa:bb:cc:00:00:02' in error(admin, "client", "unassign", "aa:bb:cc:00:00:02", "win11")
    assert 'vdisk "win11" is not assigned to client aa:bb:cc:00:00:02' in error(admin, "session", "open", "aa:bb:cc:00:00:02", "win11")

    uri = admin("session", "open", "aa:bb:cc:00:00:01", "dev").stdout.strip()
    assert uri.startswith("nbd://127.0.0.1:10999/s/") and len(uri.rsplit("/", 1)[1]) == 48
    refused = error(admin, "session", "open", "aa:bb:cc:00:00:02", "dev")
    assert 'private vdisk "dev" is in use by session' in refused and "aa:bb:cc:00:00:01" in refused
    assert "osstream vdisk unlock dev" in refused
    sessions = json.loads(admin("--json", "session", "list").stdout)
    assert len(sessions) == 1 and sessions[0]["vdisk"] == "dev"
    assert "live session(s)" in error(admin, "vdisk", "rm", "dev")
    admin("session", "close", sessions[0]["id"])
    assert "no live session with id" in error(admin, "session", "close", sessions[0]["id"])
    opened = json.loads(admin("--json", "session", "open", "aa:bb:cc:00:00:02", "dev").stdout)
    assert opened["uri"].endswith(opened["token"])
    admin("vdisk", "unlock", "dev")
    admin("vdisk", "rm", "dev", "--force")
    assert json.loads(admin("--json", "session", "list").stdout) == []
    assert len(json.loads(admin("--json", "session", "list", "--all").stdout)) == 2


def test_unknown_client_policy(admin):
    assert admin("policy", "show").stdout.strip() == "unknown clients: ignore"
    assert "choose ignore, register or register-and-assign" in error(admin, "policy", "set", "welcome")
    assert "template client aa:bb:cc:00:00:09 does not exist" in error(admin, "policy", "set", "register-and-assign:aabbcc000009")
    admin("client", "add", "aa:bb:cc:00:00:09", "--name", "template")
    admin("policy", "set", "register-and-assign:aabbcc000009")
    assert json.loads(admin("--json", "policy", "show").stdout) == {"policy": "register-and-assign", "template": "aa:bb:cc:00:00:09"}


def test_catalog_is_a_sqlite_file_in_the_data_dir(admin):
    admin("client", "add", "aa:bb:cc:00:00:01")
    assert (admin.data / "catalog.db").exists()


def test_a_bad_catalog_url_is_explained(tmp_path):
    config = tmp_path / "osstream.toml"
    config.write_text('[catalog]\nurl = "mysql://db/osstream"\n')
    out = subprocess.run([BINARY, "--config", str(config), "client", "list"], capture_output=True, text=True)
    assert out.returncode == 2 and "must start with sqlite:// or postgres://" in out.stderr


def test_import_and_export_on_a_file_backend(admin, tmp_path):
    from conftest import sha256
    raw = tmp_path / "new.raw"
    random_image(raw, 3 * MIB + 512, seed=5, holes=[(MIB, MIB)])
    out = admin("vdisk", "import", str(raw), "fresh", "--backend", "images", "--quiet")
    assert f"sha256 {sha256(raw)} verified" in out.stderr
    stored = admin.data / "images" / "fresh.img"
    assert sha256(stored) == sha256(raw)
    assert os.stat(stored).st_blocks * 512 <= 2 * MIB + 64 * 1024, "the hole stays a hole"
    assert "fresh" in admin("vdisk", "list").stdout
    assert not [p for p in os.listdir(admin.data / "images") if p.startswith(".")], "no temporary file left"
    exported = tmp_path / "out.raw"
    admin("vdisk", "export", "fresh", str(exported), "--quiet")
    assert sha256(exported) == sha256(raw)

    assert "is not a file" in error(admin, "vdisk", "import", str(tmp_path / "missing.raw"), "x", "--backend", "images")
    assert "exists already" in error(admin, "vdisk", "import", str(raw), "fresh", "--backend", "images")
    assert "already has an image" in error(admin, "vdisk", "import", str(raw), "other", "--backend", "images",
                                           "--key", "fresh")
    assert "invalid image name" in error(admin, "vdisk", "import", str(raw), "../up", "--backend", "images")
    assert 'no backend named "nowhere"' in error(admin, "vdisk", "import", str(raw), "x", "--backend", "nowhere")
    assert "--force" in error(admin, "vdisk", "export", "fresh", str(exported))
    assert 'no vdisk named' in error(admin, "vdisk", "export", "ghost", str(tmp_path / "g.raw")) or \
        "ghost" in error(admin, "vdisk", "export", "ghost", str(tmp_path / "g.raw"))


def test_import_onto_a_backend_that_cannot_store_images_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "osstream.toml"
    config.write_text(f'data_dir = "{data}"\n[demo]\ncreate = false\n'
                      '[backends.nas]\nkind = "nfs"\nserver = "127.0.0.1"\nexport = "/export"\n')
    raw = tmp_path / "disk.raw"
    random_image(raw, MIB, seed=6)
    subprocess.run([BINARY, "--config", str(config), "init"], check=True, capture_output=True, timeout=60)
    out = subprocess.run([BINARY, "--config", str(config), "vdisk", "import", str(raw), "disk", "--backend", "nas"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "backend 'nas' (kind nfs) cannot import images" in out.stderr, out.stderr
