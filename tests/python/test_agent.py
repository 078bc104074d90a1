"""The client agent (osstream-agent) end to end, with real clients on its Unix socket
(nbdcopy, libnbd): it serves the session's disk byte-exact, keeps the client's writes on
the client, caches the base on a local folder that a later session reads instead of the
server, pins and fetches the boot set the server's profile names, rides out a server
restart in the middle of a copy, writes a private vdisk through to the server, and
refuses bad input with clear errors."""

import json
import os
import signal
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, free_port, random_image, sha256, wait_for

AGENT = os.path.join(os.path.dirname(BINARY), "osstream-agent")
MIB = 1 << 20
BLOCK = 64 * 1024
SIZE = 32 * MIB
BOOT = [100, 3, 4, 5, 200, 7, 50, 8, 9, 300]


@pytest.fixture
def lab(make_server):
    return build_lab(make_server)


def build_lab(make_server, quiet="500ms", grace=None):
    http = free_port()
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    + (f'[sessions]\ngrace = "{grace}"\n' if grace else "")
                    + f'[profile]\nquiet = "{quiet}"\nmin_bytes = "64KiB"\n'
                    f'[http]\nenabled = true\nlisten = "127.0.0.1:{http}"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    s.http_port = http
    random_image(s.images / "deb.img", SIZE, seed=5)
    random_image(s.images / "dev.img", 4 * MIB, seed=6)
    (s.images / "boot").mkdir()
    (s.images / "boot" / "vmlinuz").write_bytes(b"kernel")
    (s.images / "boot" / "initrd").write_bytes(b"initrd")
    s.start()
    # Booted as linux-nbd, as agent clients are: a new session of it is what the agent
    # opens when a restarted server ended the old one.
    s.cli("vdisk", "add", "deb", "--backend", "images", "--boot", "linux-nbd", "--kernel", "vmlinuz",
          "--initrd", "initrd")
    s.cli("vdisk", "add", "dev", "--backend", "images", "--mode", "private")
    s.cli("client", "add", "aa:bb:cc:00:00:01")
    s.cli("client", "assign", "aa:bb:cc:00:00:01", "deb")
    s.cli("client", "assign", "aa:bb:cc:00:00:01", "dev")
    return s


class Agent:
    """One `osstream-agent run` for a fresh session of `vdisk`."""

    def __init__(self, lab, tmp_path, vdisk="deb", cache=True, extra=(), name="agent"):
        uri = lab.cli("session", "open", "aa:bb:cc:00:00:01", vdisk)
        self.token = uri.rsplit("/s/", 1)[1]
        self.socket = tmp_path / f"{name}.sock"
        self.cache = tmp_path / "cache"
        self.log = tmp_path / f"{name}.log"
        self.stats_file = tmp_path / f"{name}-stats.json"
        args = [AGENT, "run", "--nbd", f"127.0.0.1:{lab.port}", "--export", f"s/{self.token}",
                "--info", f"http://127.0.0.1:{lab.http_port}/agent/{self.token}",
                "--socket", str(self.socket), "--stats", str(self.stats_file), *extra]
        if cache:
            args += ["--cache-dir", str(self.cache), "--cache-size", "64MiB"]
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_for("the agent to serve", lambda: "agent: serving the disk" in self.log.read_text()
                 or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log.read_text()

    @property
    def uri(self):
        return f"nbd+unix:///disk?socket={self.socket}"

    def handle(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log_file.close()
        return self.stats()

    def stats(self):
        return json.loads(self.stats_file.read_text())


def read_boot(agent, image):
    """Reads the blocks of BOOT through `agent`, as a booting kernel would, and checks them."""
    h = agent.handle()
    for block in BOOT:
        offset = block * BLOCK + 1024
        assert h.pread(4096, offset) == image[offset:offset + 4096]
    h.shutdown()


def copy(uri, out):
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
    return sha256(out)


def test_the_agent_serves_the_disk_keeps_writes_local_and_a_later_session_reads_its_cache(lab, tmp_path):
    image = sha256(lab.images / "deb.img")
    first = Agent(lab, tmp_path)
    assert copy(first.uri, tmp_path / "copy1.img") == image
    h = first.handle()
    assert h.get_size() == SIZE and not h.is_read_only()
    h.pwrite(b"written on the client" * 100, 5 * MIB + 3)
    h.flush()
    assert h.pread(2100, 5 * MIB + 3) == b"written on the client" * 100
    h.shutdown()
    stats = first.stop()
    assert sha256(lab.images / "deb.img") == image, "the base image was never written"
    assert stats["writes"] == "local" and stats["server"]["written_bytes"] == 0, stats
    assert stats["overlay"]["used"] > 0, stats
    assert stats["server"]["read_bytes"] >= SIZE, stats
    assert stats["cache"]["bytes"] >= SIZE, stats

    # A new session (the next boot): its writes are gone, the base comes from the cache.
    second = Agent(lab, tmp_path, name="agent2")
    h = second.handle()
    assert h.pread(2100, 5 * MIB + 3) != b"written on the client" * 100
    h.shutdown()
    assert copy(second.uri, tmp_path / "copy2.img") == image
    stats = second.stop()
    assert stats["server"]["read_bytes"] == 0, stats
    assert stats["cache"]["hits"] >= SIZE // BLOCK and stats["cache"]["misses"] == 0, stats
    rendered = subprocess.run([AGENT, "stats", "--stats", str(second.stats_file)], capture_output=True,
                              text=True, check=True).stdout
    assert "client cache:" in rendered and "writes kept on this client" in rendered, rendered

    # clear empties it; the next session reads the server again.
    out = subprocess.run([AGENT, "clear", "--cache-dir", str(second.cache)], capture_output=True, text=True)
    assert out.returncode == 0 and "cleared the client cache" in out.stdout, out
    third = Agent(lab, tmp_path, name="agent3")
    assert copy(third.uri, tmp_path / "copy3.img") == image
    assert third.stop()["server"]["read_bytes"] >= SIZE


def test_the_boot_set_of_the_servers_profile_is_pinned_and_fetched_before_the_kernel_asks(lab, tmp_path):
    image = (lab.images / "deb.img").read_bytes()
    first = Agent(lab, tmp_path, cache=False)
    read_boot(first, image)
    first.stop()
    wait_for("the boot to be recorded", lambda: "boot profile recorded" in lab.log.read_text())
    info = json.loads(subprocess.run(["curl", "-sf", f"http://127.0.0.1:{lab.http_port}/agent/{first.token}"],
                                     capture_output=True, text=True, check=True).stdout)
    assert sorted(info["boot_set"]) == sorted(BOOT) and info["writes"] == "local", info

    # An empty cache: the boot set is fetched at start, before any read of the kernel.
    second = Agent(lab, tmp_path, name="agent2")
    wait_for("the boot set", lambda: second.stats_file.exists() and second.stats()["boot_set"]["done"])
    stats = second.stats()
    assert stats["boot_set"]["blocks"] == len(BOOT) and stats["boot_set"]["fetched"] == len(BOOT), stats
    assert stats["boot_set"]["local_at_start"] == 0, stats
    read_boot(second, image)
    stats = second.stop()
    assert stats["server"]["read_bytes"] == len(BOOT) * BLOCK, stats
    assert stats["cache"]["pinned"] == len(BOOT), stats

    # The next boot finds its boot set on the client and reads nothing of it from the server.
    third = Agent(lab, tmp_path, name="agent3")
    wait_for("the boot set", lambda: third.stats_file.exists() and third.stats()["boot_set"]["done"])
    read_boot(third, image)
    stats = third.stop()
    assert stats["boot_set"]["local_at_start"] == len(BOOT) and stats["boot_set"]["fetched"] == 0, stats
    assert stats["server"]["read_bytes"] == 0, stats


def test_booted_ends_the_recording_of_the_boot_at_once(make_server, tmp_path):
    lab = build_lab(make_server, quiet="120s")
    image = (lab.images / "deb.img").read_bytes()
    agent = Agent(lab, tmp_path)
    read_boot(agent, image)
    info = f"http://127.0.0.1:{lab.http_port}/agent/{agent.token}"
    out = subprocess.run([AGENT, "booted", "--info", info], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "boot recorded" in out.stdout, out
    wait_for("the boot to be recorded", lambda: "boot profile recorded (the client said its boot is complete)"
             in lab.log.read_text(), timeout=10)
    profile = json.loads(lab.cli("--json", "profile", "show", "deb"))
    assert profile["boots"] == 1 and profile["boot_set_blocks"] == len(BOOT), profile
    # Again: nothing is being recorded any more; a bad token is refused.
    out = subprocess.run([AGENT, "booted", "--info", info], capture_output=True, text=True, timeout=30)
    assert "nothing was being recorded" in out.stdout, out
    out = subprocess.run([AGENT, "booted", "--info", f"http://127.0.0.1:{lab.http_port}/agent/nope"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "unknown session token" in out.stderr, out
    agent.stop()


def test_a_copy_through_the_agent_survives_a_server_restart(lab, tmp_path):
    image = sha256(lab.images / "deb.img")
    agent = Agent(lab, tmp_path)
    out = tmp_path / "copy.img"
    # The agent is connected (one block read) when the server goes away; the copy starts
    # while it is away, so its reads wait for the reconnect instead of racing it: a copy
    # of 32 MiB on loopback can finish before a restart could begin.
    h = agent.handle()
    assert h.pread(BLOCK, 0) == (lab.images / "deb.img").read_bytes()[:BLOCK]
    lab.stop()
    copier = subprocess.Popen(["nbdcopy", "--requests=1", "--connections=1", "--request-size=65536",
                               agent.uri, str(out)])
    time.sleep(1.5)
    assert copier.poll() is None, "the copy finished while the server was away"
    lab.start()
    assert copier.wait(timeout=120) == 0
    assert sha256(out) == image
    h.shutdown()
    stats = agent.stop()
    assert stats["server"]["reconnects"] >= 1, stats
    log = agent.log.read_text()
    # The server ended the session (its RAM overlay went with the restart); the agent's
    # writes are on the client, so it opened a new session of the same image instead.
    assert "the session cannot go on here; opening a new one" in log and "connected again" in log, log


def test_an_image_changed_while_the_server_was_away_fails_reads_instead_of_mixing(lab, tmp_path):
    agent = Agent(lab, tmp_path)
    h = agent.handle()
    before = h.pread(65536, 0)
    lab.stop()
    random_image(lab.images / "deb.img", SIZE, seed=99)
    lab.start()
    with pytest.raises(nbd.Error):
        h.pread(65536, 8 * MIB)
    # Every later read of the server fails too (the client must boot again); blocks on
    # the client are still the image it booted, never the new one.
    with pytest.raises(nbd.Error):
        h.pread(4096, 16 * MIB)
    assert h.pread(65536, 0) == before != (lab.images / "deb.img").read_bytes()[:65536]
    h.shutdown()
    agent.stop()
    log = agent.log.read_text()
    assert "not the one this client booted" in log, log


def test_a_private_vdisk_is_written_through_to_the_server_and_not_cached(lab, tmp_path):
    agent = Agent(lab, tmp_path, vdisk="dev")
    h = agent.handle()
    h.pwrite(b"x" * 4096, 8192)
    h.flush()
    h.shutdown()
    stats = agent.stop()
    assert stats["writes"] == "server" and stats["server"]["written_bytes"] == 4096, stats
    assert stats["cache"]["capacity"] == 0, stats
    assert (lab.images / "dev.img").read_bytes()[8192:8192 + 4096] == b"x" * 4096
    assert "nothing is cached on this client" in agent.log.read_text()


def test_bad_input_gets_a_clear_error(lab, tmp_path):
    def run(*args):
        return subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=60)

    out = run("run", "--nbd", f"127.0.0.1:{lab.port}", "--export", "s/not-a-token",
              "--info", f"http://127.0.0.1:{lab.http_port}/agent/not-a-token", "--socket", str(tmp_path / "x.sock"))
    assert out.returncode != 0 and "cannot fetch the session's description" in out.stderr, out.stderr
    out = run("run", "--nbd", f"127.0.0.1:{lab.port}", "--export", "s/not-a-token", "--socket", str(tmp_path / "x.sock"))
    assert out.returncode != 0 and "refused the export" in out.stderr, out.stderr
    out = run("run", "--nbd", f"127.0.0.1:{lab.port}", "--export", "s/one-token",
              "--info", f"http://127.0.0.1:{lab.http_port}/agent/another-token", "--socket", str(tmp_path / "x.sock"))
    assert out.returncode != 0 and "another session" in out.stderr, out.stderr
    out = run("run", "--cmdline", str(tmp_path / "missing"))
    assert out.returncode != 0 and "cannot read" in out.stderr, out.stderr
    (tmp_path / "cmdline").write_text("console=ttyS0 quiet\n")
    out = run("run", "--cmdline", str(tmp_path / "cmdline"))
    assert out.returncode != 0 and "no nbdroot=" in out.stderr, out.stderr
    out = run("run", "--nbd", "x:1", "--export", "e", "--cache-block-size", "3000")
    assert out.returncode != 0 and "power of two" in out.stderr, out.stderr
    out = run("stats", "--cache-dir", str(tmp_path / "nowhere"))
    assert out.returncode != 0 and "has an agent run" in out.stderr, out.stderr
    # The server answers agent info only for a valid session.
    status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://127.0.0.1:{lab.http_port}/agent/nope"], capture_output=True, text=True).stdout
    assert status == "404", status
    assert "nope" not in lab.log.read_text()


def test_an_idle_agent_reconnects_at_once_so_its_private_session_outlives_a_restart(make_server, tmp_path):
    """The server's grace (4 s) ends a session nobody is connected to; the agent connects
    again as soon as the server is back, not at the kernel's next request."""
    lab = build_lab(make_server, grace="4s")
    agent = Agent(lab, tmp_path, vdisk="dev")
    h = agent.handle()
    h.pwrite(b"before" * 100, 0)
    h.flush()
    lab.stop()
    time.sleep(1)
    lab.start()
    time.sleep(7)  # idle, past the grace
    h.pwrite(b"after!" * 100, 4096)
    h.flush()
    assert h.pread(600, 4096) == b"after!" * 100
    h.shutdown()
    agent.stop()
    assert (lab.images / "dev.img").read_bytes()[4096:4696] == b"after!" * 100
    sessions = json.loads(lab.cli("--json", "session", "list"))
    assert [x["vdisk"] for x in sessions] == ["dev"], sessions


def test_a_restarted_agent_refuses_a_session_whose_local_writes_it_lost(lab, tmp_path):
    first = Agent(lab, tmp_path)
    h = first.handle()
    h.pwrite(b"kept on the client" * 10, 0)
    h.flush()
    h.shutdown()
    first.stop()
    args = first.proc.args
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "must boot again" in out.stderr, out.stderr


def test_a_second_agent_never_takes_a_live_agents_socket(lab, tmp_path):
    first = Agent(lab, tmp_path)
    # The same session (no --info: nothing cached, so no cache folder in the way).
    second = subprocess.run([AGENT, "run", "--nbd", f"127.0.0.1:{lab.port}", "--export", f"s/{first.token}",
                             "--socket", str(first.socket)], capture_output=True, text=True, timeout=60)
    assert second.returncode != 0 and "another process is listening on unix socket" in second.stderr, second.stderr
    h = first.handle()  # the first still serves on its socket
    assert h.get_size() == SIZE
    h.shutdown()
    first.stop()


def test_a_session_an_admin_closed_is_not_renewed(lab, tmp_path):
    agent = Agent(lab, tmp_path, extra=["--request-timeout", "5"])
    h = agent.handle()
    h.pread(4096, 0)
    sessions = json.loads(lab.cli("--json", "session", "list"))
    lab.cli("session", "close", sessions[0]["id"])
    # The server drops the session's connection; the agent, connecting again at once,
    # is told why and gives the session up instead of opening another.
    wait_for("the agent to learn of the close", lambda: "closed by an administrator" in agent.log.read_text())
    with pytest.raises(nbd.Error):
        h.pread(4096, 16 * MIB)  # not on the client: the server is asked, and refuses
    h.shutdown()
    agent.stop()
    log = agent.log.read_text()
    assert "closed by an administrator" in log and "new session" not in log, log
    assert json.loads(lab.cli("--json", "session", "list")) == []


def test_addresses_that_cannot_work_stop_the_agent_at_once(lab, tmp_path):
    def run(*args):
        return subprocess.run([AGENT, "run", "--socket", str(tmp_path / "x.sock"), *args],
                              capture_output=True, text=True, timeout=20)

    for nbd_address in ("nonsense", "127.0.0.1", ":10809", "127.0.0.1:0"):
        out = run("--nbd", nbd_address, "--export", "s/x")
        assert out.returncode != 0 and "is not HOST:PORT" in out.stderr, out.stderr
    for url in ("notaurl", "https://127.0.0.1/agent/x"):
        out = run("--nbd", "127.0.0.1:1", "--export", "s/x", "--info", url)
        assert out.returncode != 0 and "--info" in out.stderr, out.stderr
    out = run("--nbd", "127.0.0.1:1", "--export", "s/x", "--cache-dir", str(tmp_path / "c"), "--cache-size", "0")
    assert out.returncode != 0 and "--cache-size must hold" in out.stderr, out.stderr


def test_a_bare_token_never_reaches_the_logs(lab, tmp_path):
    uri = lab.cli("session", "open", "aa:bb:cc:00:00:01", "deb")
    token = uri.rsplit("/s/", 1)[1]
    out = subprocess.run([AGENT, "run", "--nbd", f"127.0.0.1:{lab.port}", "--export", token,
                          "--socket", str(tmp_path / "x.sock")], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and token[:6] in out.stderr, out.stderr
    assert token not in out.stderr and token not in lab.log.read_text()


def test_the_agent_outlives_a_closed_stderr(lab, tmp_path):
    """A log pipe whose reader went away (an initramfs logger that exited) costs log lines,
    never the agent serving the root disk."""
    uri = lab.cli("session", "open", "aa:bb:cc:00:00:01", "deb")
    token = uri.rsplit("/s/", 1)[1]
    socket_path = tmp_path / "p.sock"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([AGENT, "run", "--nbd", f"127.0.0.1:{lab.port}", "--export", f"s/{token}",
                             "--info", f"http://127.0.0.1:{lab.http_port}/agent/{token}",
                             "--socket", str(socket_path), "--verbose"],
                            stdout=subprocess.DEVNULL, stderr=write_end)
    os.close(write_end)
    wait_for("the socket", socket_path.exists)
    os.close(read_end)
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///disk?socket={socket_path}")
    image = (lab.images / "deb.img").read_bytes()
    for offset in range(0, 4 * MIB, 256 * 1024):
        assert h.pread(4096, offset) == image[offset:offset + 4096]
    h.shutdown()
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
