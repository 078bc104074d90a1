"""Three servers on one PostgreSQL catalog and one S3 bucket (s3rver) (issue 17), each
server in a network namespace of its own (a host of its own on the network): every
server lists the others with their load; any server's HTTP listener places a new session
on the least loaded server by capacity, preferring the servers of the client's subnet,
never on a drained or dead one, and hands the client that server's addresses; and when a
server is killed (-9) under clients writing through the agent, every client carries on on
another server and no flushed write is lost."""

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid

import nbd
import pytest

from conftest import (BINARY, Server, TcpRelay, backend_toml, free_port, random_image, s3rver_binary,
                      start_postgres, wait_for)

AGENT = os.path.join(os.path.dirname(BINARY), "osstream-agent")
MIB = 1 << 20
CHUNK = 256 * 1024
STD_MACS = [f"aa:bb:cc:00:01:{i:02x}" for i in range(12)]
NET = "10.89"
# This host's end of server b's link: a client from there is in b's subnet.
NEAR = f"{NET}.2.1"


def sh(*args):
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class Hosts:
    """A network namespace per server, joined to this one by a veth pair: NET.i.1 on this
    side, NET.i.2 inside (the server's address, its default route back through here).
    Clients, PostgreSQL and s3rver stay here; the host's own interfaces are not changed.
    The namespaces (and with them the pairs) are deleted afterwards."""

    def __init__(self, count):
        tag = uuid.uuid4().hex[:6]
        self.namespaces = []
        for i in range(1, count + 1):
            ns = f"oso-{tag}-{i}"
            here = f"os{tag}{i}"
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "link", "add", here, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "addr", "add", f"{NET}.{i}.1/24", "dev", here)
            sh("ip", "link", "set", here, "up")
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{NET}.{i}.2/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", f"{NET}.{i}.1"]):
                sh("ip", "netns", "exec", ns, *cmd)

    def close(self):
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Lab:
    """Servers a, b (capacity 1, b preferred by NEAR) and c (capacity 2, and
    `placement = false`: it serves here what is opened here, but others place on it),
    each on a host of its own; PostgreSQL and s3rver listen on this side of a's link."""

    def __init__(self, tmp_path):
        self.hosts = Hosts(3)
        self.tmp = tmp_path
        store = f"{NET}.1.1"
        self.pg_url, self.stop_pg = start_postgres(tmp_path, host=store, clients=f"{NET}.0.0/16")
        s3 = free_port()
        (tmp_path / "s3").mkdir()
        self.s3rver = subprocess.Popen([s3rver_binary(), "-d", str(tmp_path / "s3"), "-a", store, "-p", str(s3),
                                        "-s", "--configure-bucket", "vdisks"], stdout=subprocess.DEVNULL)
        wait_for("s3rver", lambda: subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{store}:{s3}/"]).returncode == 0)
        self.servers = {}
        for i, (name, capacity, subnets) in enumerate((("a", 1, []), ("b", 1, [f"{NEAR}/32"]), ("c", 2, []))):
            folder = tmp_path / name
            folder.mkdir()
            http = free_port()
            host = f"{NET}.{i + 1}.2"
            extra = (f'[catalog]\nurl = "{self.pg_url}"\n'
                     + backend_toml("bucket", s3, f'layout = "chunked"\nchunk_size = "{CHUNK // 1024}KiB"\nwritable = true',
                                    host=store)
                     + '[sessions]\nreconcile_interval = "200ms"\nserver_timeout = "2s"\n'
                     + f'shared_overlay_dir = "{tmp_path / "shared-overlays"}"\n'
                     + f'[cluster]\nname = "{name}"\ncapacity = {capacity}\nsubnets = {json.dumps(subnets)}\n'
                     + ("placement = false\n" if name == "c" else "")
                     + f'[http]\nenabled = true\nlisten = "{host}:{http}"\nmetrics = true\n'
                     + f'[nbd]\nbase_exports = false\nlisten = ["{host}:PORT"]\n')
            server = Server(folder, extra, demo=False)
            server.wrap = ["ip", "netns", "exec", self.hosts.namespaces[i]]
            server.host, server.http_port = host, http
            self.servers[name] = server
        raw = tmp_path / "std.raw"
        random_image(raw, 8 * MIB, seed=41)
        self.std_base = raw.read_bytes()
        self.cli("vdisk", "import", str(raw), "std", "--backend", "bucket", "--write-cache", "ram",
                 "--boot", "sanboot", "--quiet")
        random_image(raw, 8 * MIB, seed=43)
        self.shared_base = raw.read_bytes()
        # Its overlays are in a folder all three servers share (NFS in a real lab).
        self.cli("vdisk", "import", str(raw), "shared", "--backend", "bucket", "--write-cache", "shared-disk",
                 "--boot", "linux-nbd", "--kernel", "vmlinuz", "--initrd", "initrd", "--quiet")
        for i in range(2):
            random_image(raw, 4 * MIB, seed=50 + i)
            self.cli("vdisk", "import", str(raw), f"dev{i}", "--backend", "bucket", "--mode", "private", "--quiet")
        for i, mac in enumerate(STD_MACS):
            self.cli("client", "add", mac)
            self.cli("client", "assign", mac, "std")
            if i < 2:
                self.cli("client", "assign", mac, f"dev{i}")
            elif 4 <= i < 6:
                self.cli("client", "assign", mac, "shared")
        for server in self.servers.values():
            server.start()

    def cli(self, *args, ok=True):
        out = subprocess.run([BINARY, "--config", str(self.servers["a"].config), *args], capture_output=True, text=True, timeout=120)
        if ok is not None:
            assert (out.returncode == 0) == ok, f"{args}: {out.stdout}{out.stderr}"
        return out

    def by_address(self):
        return {(s.host, s.http_port): name for name, s in self.servers.items()}

    def boot(self, via, mac, source=None):
        """GETs /ipxe/MAC from server `via` (from `source`, an address of loopback); returns the
        name of the server the script sends the client to."""
        url = f"{self.url(via)}/ipxe/{mac}/std"
        cmd = ["curl", "-sf", "--max-time", "20", url] + (["--interface", source] if source else [])
        script = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        found = re.search(r"sanboot .*http://([0-9.]+):(\d+)/san/", script)
        assert found, script
        return self.by_address()[(found.group(1), int(found.group(2)))]

    def url(self, name):
        """Server `name`'s HTTP listener."""
        return f"http://{self.servers[name].host}:{self.servers[name].http_port}"

    def nbd(self, name):
        return f"{self.servers[name].host}:{self.servers[name].port}"

    def listed(self):
        return {s["name"]: s for s in json.loads(self.cli("--json", "server", "list").stdout)}

    def stop(self):
        for server in self.servers.values():
            server.stop()
        self.s3rver.kill()
        self.s3rver.wait()
        self.stop_pg()
        self.hosts.close()


@pytest.fixture
def lab(tmp_path):
    lab = None
    try:
        lab = Lab(tmp_path)
        yield lab
    finally:
        if lab:
            lab.stop()


def test_new_sessions_go_to_the_least_loaded_server_by_capacity_subnet_and_drain(lab):
    servers = lab.listed()
    assert set(servers) == {"a", "b", "c"}
    for name, s in servers.items():
        assert s["state"] == "alive", s
        assert s["http_url"] == lab.url(name), s
        assert s["nbd_address"] == lab.nbd(name), s
    assert servers["c"]["capacity"] == 2 and servers["b"]["subnets"] == [f"{NEAR}/32"]
    table = lab.cli("server", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "STATE", "NBD"], table

    # Eight boots through a: capacity 2 takes twice the share.
    placed = [lab.boot("a", mac) for mac in STD_MACS[:8]]
    assert {n: placed.count(n) for n in "abc"} == {"a": 2, "b": 2, "c": 4}, placed
    assert {n: s["sessions"] for n, s in lab.listed().items()} == {"a": 2, "b": 2, "c": 4}
    metrics = urllib.request.urlopen(f"{lab.url('a')}/metrics").read().decode()
    assert 'osstream_placements_total{server="c"} 4' in metrics, metrics
    assert 'osstream_cluster_server_up{server="b"' in metrics

    # A client of b's subnet goes to b, however loaded.
    assert lab.boot("a", STD_MACS[8], source=NEAR) == "b"
    # c does not steer (placement = false): what boots through it stays there, and it
    # still lists every server, so its agents can fail over.
    assert lab.boot("c", STD_MACS[11], source=NEAR) == "c"
    listed = json.loads(urllib.request.urlopen(f"{lab.url('c')}/servers").read())
    assert len(listed["servers"]) == 3, listed

    # Drained, b takes nothing new, not even from its subnet; its sessions stay.
    out = json.loads(lab.cli("--json", "server", "drain", "b").stdout)
    assert out == {"server": "b", "id": servers["b"]["id"], "draining": True}
    assert lab.listed()["b"]["state"] == "draining"
    assert lab.boot("a", STD_MACS[9], source=NEAR) != "b"
    assert lab.boot("b", STD_MACS[10]) != "b"
    assert lab.listed()["b"]["sessions"] == 3
    lab.cli("server", "undrain", "b")
    assert lab.listed()["b"]["state"] == "alive"
    missing = lab.cli("server", "drain", "nobody", ok=False)
    assert "no server is named" in missing.stderr, missing.stderr

    # A dead server gets nothing once its heartbeat lapsed (2 s).
    lab.servers["c"].proc.send_signal(signal.SIGKILL)
    lab.servers["c"].proc.wait()
    wait_for("c to be gone", lambda: lab.listed()["c"]["state"] == "gone", timeout=10)
    for mac in STD_MACS[:6]:
        assert lab.boot("a", mac) != "c"

    # Retired for good: removed once no session points at it; a live one never is.
    refused = lab.cli("server", "rm", "a", ok=False)
    assert "is alive" in refused.stderr, refused.stderr
    c_id = servers["c"]["id"]
    on_c = [s for s in json.loads(lab.cli("--json", "session", "list").stdout)
            if (s["owner"] or s["placed_on"]) == c_id]
    assert on_c, "c was sent sessions"
    table = lab.cli("session", "list").stdout
    assert f"c ({lab.nbd('c')}), placed" in table, table
    refused = lab.cli("server", "rm", "c", ok=False)
    assert f"still has {len(on_c)} open session(s)" in refused.stderr, refused.stderr
    for s in on_c:
        lab.cli("session", "close", s["id"])
    out = json.loads(lab.cli("--json", "server", "rm", "c").stdout)
    assert out == {"removed": "server", "name": "c", "id": c_id}
    assert set(lab.listed()) == {"a", "b"}
    listed = json.loads(urllib.request.urlopen(f"{lab.url('a')}/servers").read())
    assert len(listed["servers"]) == 2, listed

    # Removed while only cut off (paused here), b registers again at its next heartbeat.
    b_id = servers["b"]["id"]
    for s in json.loads(lab.cli("--json", "session", "list").stdout):
        if (s["owner"] or s["placed_on"]) == b_id:
            lab.cli("session", "close", s["id"])
    lab.servers["b"].proc.send_signal(signal.SIGSTOP)
    try:
        wait_for("b to look gone", lambda: lab.listed()["b"]["state"] == "gone", timeout=10)
        lab.cli("server", "rm", "b")
        assert set(lab.listed()) == {"a"}
    finally:
        lab.servers["b"].proc.send_signal(signal.SIGCONT)
    wait_for("b to register again", lambda: lab.listed().get("b", {}).get("state") == "alive", timeout=10)
    assert "registered this server in the catalog again" in lab.servers["b"].log.read_text()


def test_a_server_started_with_a_copied_server_id_is_refused_and_harms_nobody(lab, tmp_path):
    """A data_dir copied from a running server (a cloned machine, a restored backup)
    carries its server-id: the copy refuses to start instead of taking over the
    original's sessions; the original's restart after a kill -9 is not mistaken for it."""
    export = json.loads(lab.cli("--json", "session", "open", STD_MACS[0], "dev0").stdout)["export"]
    h = nbd.NBD()
    h.connect_uri(f"nbd://{lab.nbd('a')}/{export}")
    folder = tmp_path / "clone"
    folder.mkdir()
    a = lab.servers["a"]
    # Here, not in a's namespace: it never gets as far as binding.
    config = (a.config.read_text().split("\n", 1)[1].replace(f"{a.host}:{a.port}", "127.0.0.1:PORT")
              .replace(f"{a.host}:{a.http_port}", f"127.0.0.1:{free_port()}"))
    clone = Server(folder, config, demo=False)
    clone.data_dir.mkdir(parents=True, exist_ok=True)
    (clone.data_dir / "server-id").write_text((lab.servers["a"].data_dir / "server-id").read_text())
    with pytest.raises(RuntimeError, match="is in use by a live server"):
        clone.start()
    h.pwrite(b"still a's", 0)
    h.flush()
    assert lab.listed()["a"]["state"] == "alive"
    h.shutdown()
    # Killed and started again at once: its own predecessor's fresh heartbeat stops
    # beating, so it starts.
    lab.servers["a"].proc.send_signal(signal.SIGKILL)
    lab.servers["a"].proc.wait()
    lab.servers["a"].start()
    assert lab.listed()["a"]["state"] == "alive"


class Writer(threading.Thread):
    """Writes random 4 KiB blocks through an agent's socket, flushing after every few,
    and reads a random block after each write (mostly blocks the client never wrote,
    which the agent must fetch from a server); remembers what was flushed and the
    longest wait for one request."""

    def __init__(self, socket, size, seed):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(f"nbd+unix:///disk?socket={socket}")
        self.size = size
        self.rng = random.Random(seed)
        self.flushed = {}
        self.pending = {}
        self.longest = 0.0
        self.done = threading.Event()
        self.error = None
        self.count = 0

    def run(self):
        try:
            while not self.done.is_set():
                offset = self.rng.randrange(self.size // 4096) * 4096
                data = self.rng.randbytes(4096)
                started = time.monotonic()
                self.h.pwrite(data, offset)
                self.pending[offset] = data
                if len(self.pending) >= 4:
                    self.h.flush()
                    self.flushed.update(self.pending)
                    self.pending.clear()
                self.longest = max(self.longest, time.monotonic() - started)
                started = time.monotonic()
                self.h.pread(4096, self.rng.randrange(self.size // 4096) * 4096)
                self.longest = max(self.longest, time.monotonic() - started)
                self.count += 1
                time.sleep(0.01)
            self.h.flush()
            self.flushed.update(self.pending)
            self.pending.clear()
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.error = err

    def check(self, base):
        """Reads back every block written, and (given the base image) some never written."""
        for offset, data in self.flushed.items():
            assert self.h.pread(4096, offset) == data, f"flushed write at {offset} lost"
        if base is not None:
            untouched = [o for o in range(0, self.size, 4096) if o not in self.flushed and o not in self.pending]
            for offset in untouched[::max(1, len(untouched) // 32)]:
                assert self.h.pread(4096, offset) == base[offset:offset + 4096], f"base block at {offset} reads wrong"


def start_agent(lab, tmp_path, server, mac, vdisk, name):
    export = json.loads(lab.cli("--json", "session", "open", mac, vdisk).stdout)["export"]
    token = export.split("/", 1)[1]
    socket = tmp_path / f"{name}.sock"
    log = tmp_path / f"{name}.log"
    log_file = open(log, "w")
    proc = subprocess.Popen([AGENT, "run", "--nbd", lab.nbd(server), "--export", export,
                             "--info", f"{lab.url(server)}/agent/{token}",
                             "--socket", str(socket), "--request-timeout", "3",
                             "--stats", str(tmp_path / f"{name}-stats.json")],
                            stdout=log_file, stderr=subprocess.STDOUT)
    wait_for(f"agent {name}", lambda: "agent: serving the disk" in log.read_text() or proc.poll() is not None)
    assert proc.poll() is None, log.read_text()
    return proc, socket, log


def test_clients_writing_through_the_agent_carry_on_when_their_server_is_killed(lab, tmp_path):
    # Booted as linux-nbd, as agent clients are: a standard session's writes are on the
    # client, and the agent opens a new session (through any server) when its server died.
    lab.cli("vdisk", "set", "std", "--boot", "linux-nbd", "--kernel", "vmlinuz", "--initrd", "initrd")
    agents = []
    for i in range(2):
        agents.append(("dev", i, *start_agent(lab, tmp_path, "a", STD_MACS[i], f"dev{i}", f"dev{i}")))
    for i in range(2, 4):
        agents.append(("std", i, *start_agent(lab, tmp_path, "a", STD_MACS[i], "std", f"std{i}")))
    # Writes to the server, into an overlay on the shared folder: the session itself moves.
    for i in range(4, 6):
        agents.append(("shared", i, *start_agent(lab, tmp_path, "a", STD_MACS[i], "shared", f"shared{i}")))
    for _, _, _, _, log in agents:
        wait_for("the agent to learn the servers", lambda: "servers to fail over to" in log.read_text())
    writers = []
    for kind, i, _, socket, _ in agents:
        size = 4 * MIB if kind == "dev" else 8 * MIB
        writers.append(Writer(socket, size, seed=i))
    for w in writers:
        w.start()
    time.sleep(2)
    before = [w.count for w in writers]
    killed_at = time.monotonic()
    lab.servers["a"].proc.send_signal(signal.SIGKILL)
    lab.servers["a"].proc.wait()
    # Every client makes progress again on b or c.
    wait_for("every writer to go on", lambda: all(w.count > b + 20 for w, b in zip(writers, before))
             or any(w.error for w in writers), timeout=60)
    interruption = time.monotonic() - killed_at
    for w in writers:
        w.done.set()
    for w in writers:
        w.join(timeout=60)
        assert w.error is None, w.error
    print("longest request wait per client: "
          f"{[(kind, round(w.longest, 1)) for (kind, *_), w in zip(agents, writers)]} s; all going again after "
          f"{interruption:.1f} s")
    assert max(w.longest for w in writers) < 30
    bases = {"std": lab.std_base, "shared": lab.shared_base, "dev": None}
    for (kind, *_), w in zip(agents, writers):
        w.check(bases[kind])
    for kind, i, proc, _, log in agents:
        text = log.read_text()
        assert "connected again" in text, text
        if kind == "shared":
            assert "new session" not in text, text
    # The private vdisks' flushed writes are on the shared store, byte for byte.
    for (kind, i, proc, _, _), w in zip(agents, writers):
        w.h.shutdown()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if kind != "dev":
            continue
        out = tmp_path / f"dev{i}-export.raw"
        lab.servers["b"].cli("vdisk", "export", f"dev{i}", str(out), "--quiet")
        data = out.read_bytes()
        for offset, block in w.flushed.items():
            assert data[offset:offset + 4096] == block, f"dev{i}: flushed write at {offset} lost"
    holders = {s["name"]: s["sessions"] for s in lab.listed().values()}
    assert lab.listed()["a"]["state"] == "gone", holders
    # The survivors say what they did with a's sessions.
    logs = lab.servers["b"].log.read_text() + lab.servers["c"].log.read_text()
    assert "took the session over from server a" in logs or "released: its server" in logs, logs[-3000:]


def test_plain_clients_behind_a_floating_address_when_their_server_is_killed(lab):
    """No agent: a stock client reaches the servers through one address that keepalived
    would move. Its private session, and a standard session whose overlay is on the shared
    folder (`shared-disk`), reattach on the next server once the dead server's heartbeat
    lapsed, with every flushed write; a standard session whose overlay died with its
    server is refused by the next server (the client must boot again)."""
    vip = TcpRelay(lab.servers["a"].port, host=lab.servers["a"].host)
    exports = {}
    for mac, vdisk in ((STD_MACS[0], "dev0"), (STD_MACS[2], "std"), (STD_MACS[4], "shared")):
        exports[vdisk] = json.loads(lab.cli("--json", "session", "open", mac, vdisk).stdout)["export"]
    handles, written = {}, {}
    for vdisk, export in exports.items():
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{vip.port}/{export}")
        data = random.Random(vdisk).randbytes(64 * 1024)
        h.pwrite(data, MIB)
        h.flush()
        handles[vdisk], written[vdisk] = h, data
    killed_at = time.monotonic()
    lab.servers["a"].proc.send_signal(signal.SIGKILL)
    lab.servers["a"].proc.wait()
    vip.move(lab.servers["b"].port, host=lab.servers["b"].host)  # keepalived's VRRP would take ~3 s more to notice
    for h in handles.values():
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)

    def attach(export):
        h = nbd.NBD()
        try:
            h.connect_uri(f"nbd://127.0.0.1:{vip.port}/{export}")
            return h
        except nbd.Error as err:
            return str(err)

    interruption = {}
    for vdisk in ("dev0", "shared"):
        while isinstance(result := attach(exports[vdisk]), str):
            assert time.monotonic() - killed_at < 30, result
            time.sleep(0.2)
        interruption[vdisk] = time.monotonic() - killed_at
        assert result.pread(64 * 1024, MIB) == written[vdisk]
        result.pwrite(b"\x5a" * 4096, 0)
        result.flush()
        result.shutdown()
    refused = attach(exports["std"])
    assert isinstance(refused, str), "a standard session resumed on an empty overlay"
    assert "keeps its write overlay on server a" in lab.servers["b"].log.read_text()
    print(f"private session back through the floating address {interruption['dev0']:.1f} s after the kill, "
          f"shared-disk standard session {interruption['shared']:.1f} s "
          "(server_timeout 2 s, without the VRRP failover time)")
    vip.close()
