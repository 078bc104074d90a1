"""Admin conventions (issue 16, after Warewulf's wwctl): every admin command prints JSON
with --json, sizes in tables are for people, `client import` creates or updates clients
from CSV or TOML all or nothing, and `client list --group` filters."""

import json
import os
import re
import subprocess
import time

import pytest

from conftest import BINARY, ROOT, Server

KIB = 1 << 10
# Not a whole number of any unit: raw bytes would show as "1234567890B".
ODD_SIZE = 1_234_567_890
TRACE = os.path.join(ROOT, "benches", "traces", "debian12-multiuser-1.trace")
# Commands that print no admin output, so have no JSON form.
WITHOUT_JSON = {"serve", "completions", "man", "help"}


@pytest.fixture
def lab(tmp_path):
    """A catalog with vdisks `win11` (1.1 GiB, sparse), `debian` and private `dev`."""
    s = Server(tmp_path, '[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n', demo=False)
    for name, size in [("win11", ODD_SIZE), ("debian", 64 << 20), ("dev", 4 << 20)]:
        with open(s.images / f"{name}.img", "wb") as f:
            f.truncate(size)

    def run(*args, ok=True, stdin=None):
        out = subprocess.run([BINARY, "--config", str(s.config), *args], capture_output=True, text=True,
                             timeout=120, input=stdin)
        assert (out.returncode == 0) == ok, f"{args}: rc {out.returncode}\n{out.stdout}{out.stderr}"
        if not ok:
            assert out.returncode == 2 and out.stderr.startswith("osstream: "), out
        return out

    run("vdisk", "add", "win11", "--backend", "images")
    run("vdisk", "add", "debian", "--backend", "images")
    run("vdisk", "add", "dev", "--backend", "images", "--mode", "private")
    s.run = run
    yield s
    s.stop()


def as_json(lab, *args, stdin=None):
    """Runs a command with --json; its stdout must be exactly one JSON document."""
    return json.loads(lab.run("--json", *args, stdin=stdin).stdout)


def subcommands(*command):
    """The subcommands `osstream COMMAND --help` lists."""
    text = subprocess.run([BINARY, *command, "--help"], capture_output=True, text=True, check=True).stdout
    if "Commands:\n" not in text:
        return set()  # a command of its own (init, top)
    listed = text.split("Commands:\n", 1)[1].split("\n\n", 1)[0]
    return {line.split()[0] for line in listed.splitlines() if line.strip()} - WITHOUT_JSON


def profile_json(vdisk, blocks):
    return json.dumps({"format": 1, "vdisk": vdisk, "image": "elsewhere", "generation": "1", "block_size": 64 * KIB,
                       "boots": 2, "blocks": [{"block": b, "share": 1.0, "position": i / len(blocks)}
                                              for i, b in enumerate(blocks)]})


def test_every_admin_command_prints_json(lab, tmp_path):
    mac = "aa:bb:cc:00:00:01"
    covered = set()

    def check(*args, stdin=None):
        covered.add(tuple([a for a in args if not a.startswith("-")][:2]))
        return as_json(lab, *args, stdin=stdin)

    # Cache stats come from a server that ran on this data_dir; top needs it running.
    lab.start()
    assert check("top", "--once")["clients"] == []
    lab.stop()
    [server] = check("server", "list")
    assert server["state"] == "stopped" and server["sessions"] == 0, server
    assert check("server", "drain", server["name"]) == {"server": server["name"], "id": server["id"], "draining": True}
    assert check("server", "undrain", server["name"])["draining"] is False
    assert check("server", "rm", server["name"]) == {"removed": "server", "name": server["name"], "id": server["id"]}
    assert check("init")["created"] is False
    assert check("config", "show")["data_dir"] == str(lab.data_dir)
    assert check("cache", "stats")["layers"]
    assert check("bench", "cache", "--trace", TRACE, "--capacity", "64MiB", "--policy", "s3fifo")[0]["capacity"] == 64 << 20

    assert check("vdisk", "list")[0]["name"] == "debian"
    assert check("vdisk", "show", "win11")["size"] == ODD_SIZE
    assert check("vdisk", "set", "win11", "--description", "Windows")["description"] == "Windows"
    raw = tmp_path / "small.raw"
    raw.write_bytes(b"\x01" * (128 * KIB))
    assert check("vdisk", "import", str(raw), "small", "--backend", "images", "--quiet")["size"] == 128 * KIB
    exported = check("vdisk", "export", "small", str(tmp_path / "out.raw"), "--quiet")
    assert exported["size"] == 128 * KIB and len(exported["sha256"]) == 64
    assert check("vdisk", "add", "extra", "--backend", "images", "--key", "debian")["name"] == "extra"

    assert check("client", "add", mac, "--name", "pc1", "--group", "lab")["group"] == "lab"
    assert check("client", "set", mac, "--hostname", "lab-pc1")["hostname"] == "lab-pc1"
    assert check("client", "assign", mac, "dev") == {"mac": mac, "vdisk": "dev", "position": 0, "is_default": True}
    assert check("client", "assign", mac, "win11")["position"] == 1
    assert [a["vdisk"] for a in check("client", "show", mac)["vdisks"]] == ["dev", "win11"]
    assert check("client", "list", "--group", "lab")[0]["mac"] == mac
    assert check("client", "unassign", mac, "win11") == {"removed": "assignment", "mac": mac, "vdisk": "win11"}
    imported = check("client", "import", "-", "--format", "csv", stdin="mac,name\naa:bb:cc:00:00:02,pc2\n")
    assert (imported["created"], imported["clients"][0]["result"]) == (1, "created")

    opened = check("session", "open", mac, "dev")
    assert opened["uri"].endswith(opened["token"])
    assert check("session", "list")[0]["bytes_read"] == 0
    assert check("vdisk", "unlock", "dev") == {"unlocked": "vdisk", "name": "dev", "closed_session": opened["id"]}
    assert check("vdisk", "unlock", "dev") == {"unlocked": "vdisk", "name": "dev", "closed_session": None}
    second = check("session", "open", mac, "dev")
    assert check("session", "close", second["id"]) == {"closed": "session", "id": second["id"]}

    assert check("policy", "show") == {"policy": "ignore"}
    assert check("policy", "set", "register") == {"policy": "register"}

    assert check("profile", "import", "win11", "-", stdin=profile_json("win11", [1, 2, 3]))["boots"] == 2
    assert check("profile", "show", "win11")["boot_set_bytes"] == 3 * 64 * KIB
    assert check("profile", "export", "win11")["boots"] == 2  # the profile itself
    written = tmp_path / "win11.profile.json"
    assert check("profile", "export", "win11", "-o", str(written)) == {
        "exported": "profile", "vdisk": "win11", "file": str(written)}
    assert check("profile", "clear", "win11") == {"vdisk": "win11", "cleared": True}

    assert check("client", "rm", "aa:bb:cc:00:00:02") == {"removed": "client", "mac": "aa:bb:cc:00:00:02"}
    assert check("vdisk", "rm", "extra") == {"removed": "vdisk", "name": "extra"}

    # Every subcommand the CLI has was run above: a new one needs its JSON here too.
    every = {("init",)}
    for command in subcommands():
        nested = subcommands(command) if command != "init" else set()
        every |= {(command, sub) for sub in nested} or {(command,)}
    assert every - covered == set(), f"admin commands not checked for --json: {sorted(every - covered)}"

    # Errors are no JSON: a message on stderr and status 2, with or without --json.
    failed = lab.run("--json", "vdisk", "rm", "extra", ok=False)
    assert failed.stdout == "" and 'vdisk "extra" does not exist' in failed.stderr


def test_sizes_in_tables_are_for_people(lab):
    # A server that ran on this data_dir leaves the cache stats.
    lab.start()
    lab.stop()
    mac = "aa:bb:cc:00:00:01"
    lab.run("client", "add", mac)
    lab.run("client", "assign", mac, "win11")
    lab.run("session", "open", mac, "win11")
    lab.run("profile", "import", "win11", "-", stdin=profile_json("win11", list(range(10))))
    tables = {
        "vdisk list": lab.run("vdisk", "list").stdout,
        "session list": lab.run("session", "list").stdout,
        "profile show": lab.run("profile", "show", "win11").stdout,
        "cache stats": lab.run("cache", "stats").stdout,
    }
    for what, text in tables.items():
        assert not re.search(r"\b\d{4,}B\b", text), f"{what} shows raw bytes:\n{text}"
    rows = {line.split()[0]: line.split() for line in tables["vdisk list"].splitlines()}
    assert rows["win11"][2] == "1.1GiB" and rows["debian"][2] == "64MiB" and rows["dev"][2] == "4.0MiB"
    assert "boot set:    640KiB in 10 blocks of 64KiB" in tables["profile show"]
    header, row = tables["session list"].splitlines()[:2]
    read_at = header.index("READ")
    assert row[read_at:].split()[:2] == ["0B", "0B"], tables["session list"]
    held = re.search(r"^ram\s.*?(\S+ / \S+)", tables["cache stats"], re.M)
    assert held and re.fullmatch(r"\d+(\.\d)?[KMGT]?i?B / \d+(\.\d)?[KMGT]?i?B", held.group(1)), tables["cache stats"]
    # JSON keeps exact bytes.
    assert {v["name"]: v["size"] for v in as_json(lab, "vdisk", "list")}["win11"] == ODD_SIZE


def generated_clients(count, group_of=lambda i: "lab" if i % 2 else "office"):
    return [{"mac": f"52:54:00:00:{i >> 8:02x}:{i & 0xff:02x}", "name": f"pc{i}", "hostname": f"lab-pc{i}",
             "group": group_of(i), "vdisks": ["win11", "debian"] if i % 3 else ["debian"]} for i in range(count)]


def write_csv(path, clients):
    lines = ["mac,name,hostname,group,vdisks"]
    lines += [f"{c['mac']},{c['name']},{c['hostname']},{c['group']},{';'.join(c['vdisks'])}" for c in clients]
    path.write_text("\n".join(lines) + "\n")


def write_toml(path, clients):
    tables = [f'[[client]]\nmac = "{c["mac"]}"\nname = "{c["name"]}"\nhostname = "{c["hostname"]}"\n'
              f'group = "{c["group"]}"\nvdisks = {json.dumps(c["vdisks"])}\n' for c in clients]
    path.write_text("\n".join(tables))


@pytest.mark.parametrize("writer,suffix", [(write_csv, "csv"), (write_toml, "toml")])
def test_importing_500_clients_twice_changes_nothing_the_second_time(lab, tmp_path, writer, suffix):
    clients = generated_clients(500)
    path = tmp_path / f"lab.{suffix}"
    writer(path, clients)
    started = time.monotonic()
    first = lab.run("client", "import", str(path)).stdout
    elapsed = time.monotonic() - started
    assert first.strip() == "created 500, updated 0, unchanged 0"
    assert elapsed < 10, f"500 clients took {elapsed:.1f}s"
    second = as_json(lab, "client", "import", str(path))
    assert (second["created"], second["updated"], second["unchanged"]) == (0, 0, 500)
    assert {c["result"] for c in second["clients"]} == {"unchanged"}
    assert second["clients"][0] == {"line": 2 if suffix == "csv" else 1, "mac": clients[0]["mac"], "result": "unchanged",
                                    "changed": [], "assigned": [], "unassigned": []}

    listed = as_json(lab, "client", "list")
    assert len(listed) == 500
    shown = as_json(lab, "client", "show", clients[1]["mac"])
    assert (shown["name"], shown["hostname"], shown["group"]) == ("pc1", "lab-pc1", "lab")
    assert [(a["vdisk"], a["is_default"]) for a in shown["vdisks"]] == [("win11", True), ("debian", False)]

    # Change one client in the file: only it is updated; its extra vdisk stays unless --exact.
    clients[1].update(name="renamed", group="office", vdisks=["debian"])
    writer(path, clients)
    third = as_json(lab, "client", "import", str(path))
    assert (third["created"], third["updated"], third["unchanged"]) == (0, 1, 499)
    updated = [c for c in third["clients"] if c["result"] == "updated"]
    assert updated == [{"line": updated[0]["line"], "mac": clients[1]["mac"], "result": "updated",
                        "changed": ["name", "group"], "assigned": [], "unassigned": []}]
    assert len(as_json(lab, "client", "show", clients[1]["mac"])["vdisks"]) == 2
    exact = lab.run("client", "import", str(path), "--exact").stdout
    assert exact.splitlines() == ["created 0, updated 1, unchanged 499",
                                  f"  updated {clients[1]['mac']} (line {updated[0]['line']}): unassigned win11"]
    assert [(a["vdisk"], a["is_default"]) for a in as_json(lab, "client", "show", clients[1]["mac"])["vdisks"]] == [
        ("debian", True)]
    assert lab.run("client", "import", str(path), "--exact").stdout.strip() == "created 0, updated 0, unchanged 500"


def test_a_bad_file_names_every_bad_line_and_changes_nothing(lab, tmp_path):
    lab.run("client", "add", "52:54:00:00:00:09", "--name", "taken")
    before = as_json(lab, "client", "list")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "mac,name,hostname,group,vdisks\n"      # 1
        "52:54:00:00:01:01,pc1,,lab,win11\n"     # 2 fine
        "52:54:00:00:01:zz,pc2,,lab,\n"          # 3 bad MAC
        "52-54-00-00-01-01,pc3,,lab,\n"          # 4 the MAC of line 2 again
        "52:54:00:00:01:04,pc4,,lab,ghost\n"     # 5 unknown vdisk
        "52:54:00:00:01:05,taken,,lab,\n"        # 6 a name another client has
        "52:54:00:00:01:06,pc6,,lab\n"           # 7 a field short
        "\"52:54:00:00:01:07\",\"pc 7\",,lab,\n"  # 8 a name with a space
    )
    out = lab.run("client", "import", str(bad), ok=False)
    assert "6 problem(s); nothing was imported" in out.stderr, out.stderr
    problems = [line.strip() for line in out.stderr.splitlines()[1:]]
    assert [int(re.match(r"line (\d+):", p).group(1)) for p in problems] == [3, 4, 5, 6, 7, 8], problems
    assert 'invalid MAC address "52:54:00:00:01:zz"' in problems[0]
    assert "52:54:00:00:01:01 is already on line 2" in problems[1]
    assert 'no vdisk named "ghost"' in problems[2]
    assert 'client name "taken" is already used by 52:54:00:00:00:09' in problems[3]
    assert "4 field(s), but the header has 5" in problems[4]
    assert 'invalid client name "pc 7"' in problems[5]
    assert as_json(lab, "client", "list") == before

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("mac,name,ip\n52:54:00:00:01:01,pc1,10.0.0.1\n")
    err = lab.run("--json", "client", "import", str(unknown), ok=False)
    assert err.stdout == "" and 'line 1: unknown column "ip": the columns are mac, name, hostname, group, vdisks' in err.stderr

    toml = tmp_path / "bad.toml"
    toml.write_text('[[client]]\nmac = "52:54:00:00:01:01"\nvdisks = ["ghost"]\n\n[[client]]\nmac = "52:54:00:00:01:02"\n'
                    'colour = "blue"\n')
    err = lab.run("client", "import", str(toml), ok=False).stderr
    assert 'line 1: no vdisk named "ghost"' in err and 'line 7: unknown key "colour"' in err, err
    assert "cannot tell whether" in lab.run("client", "import", str(tmp_path / "x.txt"), ok=False).stderr
    assert as_json(lab, "client", "list") == before


def test_client_list_filters_by_group(lab, tmp_path):
    path = tmp_path / "lab.csv"
    write_csv(path, generated_clients(6, group_of=lambda i: ["lab", "office", "lab"][i % 3]))
    lab.run("client", "import", str(path))
    lab.run("client", "add", "52:54:00:00:09:09")  # no group
    assert len(as_json(lab, "client", "list")) == 7
    lab_macs = [c["mac"] for c in as_json(lab, "client", "list", "--group", "lab")]
    assert lab_macs == ["52:54:00:00:00:00", "52:54:00:00:00:02", "52:54:00:00:00:03", "52:54:00:00:00:05"]
    table = lab.run("client", "list", "--group", "office").stdout.splitlines()
    assert table[0].split()[:4] == ["MAC", "NAME", "HOSTNAME", "GROUP"]
    assert [row.split()[3] for row in table[1:]] == ["office", "office"]
    nobody = lab.run("client", "list", "--group", "labs")
    assert [line.split() for line in nobody.stdout.splitlines()] == [table[0].split()]
    assert 'no client is in group "labs" (groups: lab, office)' in nobody.stderr
    assert as_json(lab, "client", "list", "--group", "labs") == []
