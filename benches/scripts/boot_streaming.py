#!/usr/bin/python3
"""Boot streaming: the Debian 12 netboot with its disk on S3 far away, cold, profiled and
warm, one run, rounds alternating.

The suite's Debian guest (tests/netboot/build-debian.sh) boots to multi-user over NBD
from osstream, everything in network namespaces (tests/python/netlab.py): osstream with
full DHCP, HTTP and NBD on a private LAN, qemu (TCG) with its iPXE ROM as the machine.
The vdisk lives on S3: s3rver inside the server's namespace, reached through an HTTP
proxy that adds a fixed delay to every request (tests/python/faultproxy.py), one proxy
and one backend per delay; kernel and initrd come from a file backend
(`--kernel images/vmlinuz-debian`). Per round, for each delay:

- cold: osstream restarted (RAM cache empty) and the vdisk's profile cleared;
- profiled: osstream restarted again, the profile the cold boot recorded in place;
- warm: the same boot again without a restart: every block already in RAM;
- agent: a machine booting through osstream-agent (Debian's initramfs with the agent
  hooked in, its cache on the machine's own virtio disk, filled by one untimed boot
  before the rounds), osstream restarted first: the reboot from the local cache;

and, once per round, the cold boot with no added delay. Each boot is timed from qemu's
start, and from the NBD attach (the server's log) to the guest's multi-user marker;
the bytes read from S3 are osstream's backend bytes minus the kernel's and initrd's.

Run as root on a quiet machine, after `cargo build --release -p osstream` and
`scripts/build-agent.sh`:
    /usr/bin/python3 benches/scripts/boot_streaming.py [--rounds 3] [--delays 10,50]
"""

import argparse
import datetime
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

from netboot import (DEBIAN_MARKER, Machine, agent_stats_on, build_debian, cache_disk,  # noqa: E402
                     debian_agent_initrd)
from netlab import Lab  # noqa: E402

BINARY = os.environ.get("OSSTREAM_BIN", os.path.join(ROOT, "target", "release", "osstream"))
LAN = "10.77.0"
SRV = f"{LAN}.1"
S3_PORT = 4569
BUCKET = "vdisks"


def wait_for(path, text, timeout=60, count=1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and open(path, errors="replace").read().count(text) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no {text!r} in {path}:\n{open(path, errors='replace').read()[-2000:]}")


def backend(name, port):
    return (f'[backends.{name}]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "bench"\n'
            f'endpoint = "http://127.0.0.1:{port}"\nregion = "us-east-1"\n'
            f'access_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\nallow_http = true\n')


class Server:
    def __init__(self, lab, srv, work, deb, delays):
        self.lab, self.srv, self.work = lab, srv, work
        self.dir = os.path.join(work, "osstream")
        images = os.path.join(self.dir, "data", "images")
        os.makedirs(os.path.join(images, "boot"), exist_ok=True)
        for name in ("vmlinuz-debian", "initrd-debian.img"):
            shutil.copy(os.path.join(deb, name), os.path.join(images, "boot", name))
        debian_agent_initrd(deb, pathlib.Path(images) / "boot" / "initrd-debian-agent.img")
        self.boot_bytes = sum(os.path.getsize(os.path.join(deb, n)) for n in ("vmlinuz-debian", "initrd-debian.img"))
        self.config = os.path.join(self.dir, "osstream.toml")
        with open(self.config, "w") as f:
            f.write(f'data_dir = "{self.dir}/data"\n[demo]\ncreate = false\n'
                    '[profile]\nquiet = "8s"\n'
                    f'[http]\nenabled = true\nlisten = "{SRV}:8080"\nmenu_timeout = "0s"\n'
                    f'[nbd]\nlisten = ["{SRV}:10809"]\n'
                    f'[pxe]\nenabled = true\nmode = "dhcp"\ninterface = "eth0"\nserver_ip = "{SRV}"\n'
                    f'[pxe.dhcp]\nrange_start = "{LAN}.100"\nrange_end = "{LAN}.200"\n'
                    '[backends.images]\nkind = "file"\nroot = "images"\n'
                    + "".join(backend(f"s3d{d}", S3_PORT + 1 + i) for i, d in enumerate(delays)))
        self.proc = None
        self.log = None

    def cli(self, *args):
        return subprocess.run(["ip", "netns", "exec", self.srv, BINARY, "--config", self.config, *args],
                              check=True, capture_output=True, text=True).stdout

    def start(self):
        self.log = os.path.join(self.dir, f"server-{time.time():.3f}.log")
        self.proc = self.lab.spawn(self.srv, [BINARY, "--config", self.config, "serve"], self.log)
        wait_for(self.log, "osstream ready")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)

    def backend_bytes(self):
        stats = json.loads(self.cli("--json", "cache", "stats"))
        return next(dict(l["counters"])["backend_bytes"] for l in stats["layers"] if l["layer"] == "cache:ram")


def attach_time(log, mac_ip_seen_after):
    """Wall-clock time of the last NBD attach logged after `mac_ip_seen_after` (for an
    agent, its request for the session's description, which it makes just before it
    connects: the server logs an NBD attach at the connection's first request, and an
    agent with its boot set on its own disk may send none for a long while)."""
    last = agent = None
    for line in open(log, errors="replace"):
        if "NBD client attached" in line or "http: agent info" in line:
            stamp = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
            if stamp >= mac_ip_seen_after:
                if "agent info" in line:
                    agent = agent or stamp
                last = stamp
    return agent or last


def boot(lab, work, server, mac, disk=None):
    """Boots `mac`; returns (qemu start to marker, NBD attach to marker) in seconds."""
    tmp = pathlib.Path(tempfile.mkdtemp(dir=work))
    machine = Machine(tmp, mac, tap=lab.tap(), netns=lab.lan, memory=768, disk=disk)
    started = time.time()
    machine.start()
    try:
        while time.time() - started < 400:
            if DEBIAN_MARKER in machine.output():
                done = time.time()
                attached = attach_time(server.log, started)
                if disk:
                    # Its own disk: let it sync and power off, as a machine that reboots does.
                    machine.proc.wait(timeout=180)
                return done - started, done - attached if attached else float("nan")
            if machine.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{mac}: no marker:\n{machine.output()[-3000:]}")
    finally:
        machine.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delays", default="10,50", help="added milliseconds per S3 request")
    parser.add_argument("--s3rver", default=os.environ.get("TEST_S3RVER") or shutil.which("s3rver") or
                        os.path.expanduser("~/.cache/osstream-test/node_modules/.bin/s3rver"))
    args = parser.parse_args()
    delays = [0] + [int(d) for d in args.delays.split(",") if d]
    deb = build_debian()
    work = tempfile.mkdtemp(prefix="osstream-streaming-")
    lab = Lab(LAN)
    results = {}  # (delay, kind) -> [(total, from_attach, s3_bytes)]
    try:
        srv = lab.host("srv", 1)
        lab.router_adverts(srv, os.path.join(work, "ra.log"))
        os.makedirs(os.path.join(work, "s3"))
        lab.spawn(srv, [args.s3rver, "-d", os.path.join(work, "s3"), "-a", "127.0.0.1", "-p", str(S3_PORT),
                        "-s", "--configure-bucket", BUCKET], os.path.join(work, "s3rver.log"))
        for i, delay in enumerate(delays):
            lab.spawn(srv, ["/usr/bin/python3", os.path.join(ROOT, "tests", "python", "faultproxy.py"),
                            "--upstream", str(S3_PORT), "--port", str(S3_PORT + 1 + i), "--delay-ms", str(delay)],
                      os.path.join(work, f"proxy-{delay}.log"))
        time.sleep(2)
        server = Server(lab, srv, work, deb, delays)
        server.cli("init")
        server.cli("vdisk", "import", os.path.join(deb, "debian.img"), "debian", "--backend", "s3d0", "--quiet")
        macs = {}
        agents = {}
        for i, delay in enumerate(delays):
            name, mac = f"deb{delay}", f"52:54:00:00:c0:{i + 1:02x}"
            macs[delay] = (name, mac)
            if delay:
                server.cli("vdisk", "add", name, "--backend", f"s3d{delay}", "--key", "debian")
            server.cli("vdisk", "set", name if delay else "debian", "--boot", "linux-nbd",
                       "--kernel", "images/vmlinuz-debian", "--initrd", "images/initrd-debian.img",
                       "--cmdline", "console=ttyS0")
            server.cli("client", "add", mac, "--hostname", f"stream-{i}")
            server.cli("client", "assign", mac, name if delay else "debian")
            if delay:
                agent_name, agent_mac = f"deb{delay}a", f"52:54:00:00:c1:{i + 1:02x}"
                server.cli("vdisk", "add", agent_name, "--backend", f"s3d{delay}", "--key", "debian",
                           "--boot", "linux-nbd", "--kernel", "images/vmlinuz-debian",
                           "--initrd", "images/initrd-debian-agent.img", "--cmdline", "console=ttyS0")
                server.cli("client", "add", agent_mac, "--hostname", f"agent-{i}")
                server.cli("client", "assign", agent_mac, agent_name)
                disk = cache_disk(pathlib.Path(work) / f"cache-{delay}.img")
                agents[delay] = (agent_name, agent_mac, disk)
        server.start()
        for delay, (agent_name, agent_mac, disk) in agents.items():
            # Fills the machine's local cache (and records the vdisk's profile).
            recorded = open(server.log).read().count("boot profile recorded")
            total, _ = boot(lab, work, server, agent_mac, disk)
            wait_for(server.log, "boot profile recorded", timeout=60, count=recorded + 1)
            print(f"agent warm-up boot at {delay} ms: {total:.1f} s from qemu start", flush=True)
        boot_set = 0
        for round_ in range(args.rounds):
            for delay in delays:
                name, mac = macs[delay]
                name = name if delay else "debian"
                kinds = ("cold",) if delay == 0 else ("cold", "profiled", "warm")
                for kind in kinds:
                    if kind != "warm":
                        server.stop()
                        server.start()
                    if kind == "cold":
                        server.cli("profile", "clear", name)
                    recorded = open(server.log).read().count("boot profile recorded")
                    total, from_attach = boot(lab, work, server, mac)
                    wait_for(server.log, "boot profile recorded", timeout=60, count=recorded + 1)
                    s3 = server.backend_bytes() - (server.boot_bytes if kind != "warm" else 0)
                    if kind == "profiled":
                        boot_set = json.loads(server.cli("--json", "profile", "show", name))["boot_set_bytes"]
                    results.setdefault((delay, kind), []).append((total, from_attach, s3))
                    print(f"round {round_ + 1} delay {delay:>2} ms {kind:<8}: {total:5.1f} s from qemu start, "
                          f"{from_attach:5.1f} s from NBD attach; S3 bytes so far {s3 / 2**20:6.1f} MiB", flush=True)
                if delay in agents:
                    agent_name, agent_mac, disk = agents[delay]
                    server.stop()
                    server.start()
                    total, from_attach = boot(lab, work, server, agent_mac, disk)
                    local = agent_stats_on(disk)
                    results.setdefault((delay, "agent"), []).append((total, from_attach, local["server"]["read_bytes"]))
                    print(f"round {round_ + 1} delay {delay:>2} ms agent   : {total:5.1f} s from qemu start, "
                          f"{from_attach:5.1f} s from NBD attach; boot set {local['boot_set']['local_at_start']}"
                          f"/{local['boot_set']['blocks']} blocks local, {local['server']['read_bytes'] / 2**20:.1f} MiB "
                          "read from the server", flush=True)
        server.stop()
        print(f"\nDebian 12 to multi-user over NBD, disk on s3rver behind a delay proxy, {args.rounds} rounds, "
              f"medians (min-max), seconds from NBD attach to the marker:\n")
        print("| added delay per S3 request | cold | profiled | warm (all in RAM) | profiled/warm | S3 bytes, profiled boot "
              "| agent, local cache, server restarted | agent/warm |")
        print("|---|---|---|---|---|---|---|---|")

        def cell(key, field=1):
            values = [r[field] for r in results.get(key, [])]
            if not values:
                return "-"
            return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

        for delay in delays:
            if delay == 0:
                print(f"| none | {cell((0, 'cold'))} | | | | | | |")
                continue
            prof = statistics.median(r[1] for r in results[(delay, "profiled")])
            warm = statistics.median(r[1] for r in results[(delay, "warm")])
            s3 = statistics.median(r[2] for r in results[(delay, "profiled")])
            agent = statistics.median(r[1] for r in results[(delay, "agent")]) if (delay, "agent") in results else None
            print(f"| {delay} ms | {cell((delay, 'cold'))} | {cell((delay, 'profiled'))} | {cell((delay, 'warm'))} "
                  f"| {prof / warm:.2f}x | {s3 / 2**20:.1f} MiB ({s3 / boot_set:.2f}x the boot set) "
                  f"| {cell((delay, 'agent'))} | {f'{agent / warm:.2f}x' if agent else '-'} |")
        print(f"\nboot set: {boot_set / 2**20:.1f} MiB; times from qemu start are in the log above")
    finally:
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
