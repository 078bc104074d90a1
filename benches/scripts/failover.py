#!/usr/bin/env python3
"""Failover interruption (issue 17): what each client sees when its server is killed.

Three servers on loopback share one PostgreSQL catalog, one s3rver bucket (chunked,
writable images) and one shared overlay folder, with the shipped `[sessions]` timers
(`server_timeout` 10 s, `reconcile_interval` 2 s) unless --server-timeout says
otherwise. Each round starts fresh servers a, b and c and, all through server a:

- six clients writing through `osstream-agent` (its defaults: no --request-timeout):
  two private vdisks, two `shared-disk` standard vdisks, two `ram` standard vdisks
  (whose writes the agent keeps on the client);
- two plain clients with no agent (libnbd, as a stock `nbd-client` would be), one private
  and one `shared-disk`, through a TCP relay that stands for a keepalived floating
  address: when server a dies the relay points at server b (keepalived's own takeover,
  about three advertisement intervals, is not included) and the client connects again
  every 200 ms until it is served.

Every client writes 4 KiB blocks at random, flushing every fourth, and reads a random
block after each write (mostly blocks it never wrote: with no client cache, the agent
fetches them from a server), about 100 of each a second.
Then server a gets `kill -9`. Reported per kind of client: the longest a request of the
agent's clients waited (the kernel's view: a slow request, never a failed one), the time
from the kill to a plain client's first write served again, and the time until every
client was going again. Every flushed write is then read back and checked, and the
script fails if one is missing.

There is no peer: no other NBD server fails over. The issue's target is under 15 s.

    cargo build --release -p osstream -p osstream-agent
    /usr/bin/python3 benches/scripts/failover.py [--rounds 3] [--server-timeout 10s]

Needs Debian's /usr/bin/python3 (python3-libnbd, pytest for the test helpers it reuses),
PostgreSQL and s3rver (scripts/test.sh installs both).
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import ROOT, free_port, stop
from scale_out_storm import start_postgres, wait_http

sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from conftest import TcpRelay  # noqa: E402
from test_scale_out import Writer  # noqa: E402

import nbd  # noqa: E402

MIB = 1 << 20
BUCKET = "vdisks"
SERVERS = ("a", "b", "c")
PRIVATE, SHARED, RAM = ["--mode", "private"], ["--write-cache", "shared-disk"], ["--write-cache", "ram"]
# (the client's kind in the table, vdisk name prefix, how the vdisk is made); "plain": no agent
KINDS = [("agent, private", "private", PRIVATE)] * 2 + [("agent, shared-disk", "shared", SHARED)] * 2 \
    + [("agent, ram (writes on the client)", "ram", RAM)] * 2 \
    + [("plain, private", "plain-private", PRIVATE), ("plain, shared-disk", "plain-shared", SHARED)]


class PlainClient(threading.Thread):
    """A client with no agent: writes through the floating address; when the connection
    breaks, connects again every 200 ms; remembers its flushed writes and when it was
    served again after the break."""

    def __init__(self, uri, size, seed):
        super().__init__(daemon=True)
        self.uri, self.size, self.rng = uri, size, random.Random(seed)
        self.h = self.connect()
        self.flushed, self.pending = {}, {}
        # Blocks whose last write was cut off unflushed: either of these (None: what was
        # there before).
        self.either = {}
        self.broken_at = self.back_at = None
        self.done = threading.Event()
        self.error = None
        self.count = 0

    def connect(self):
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def run(self):
        try:
            while not self.done.is_set():
                offset = self.rng.randrange(self.size // 4096) * 4096
                data = self.rng.randbytes(4096)
                try:
                    self.h.pwrite(data, offset)
                    self.pending[offset] = data
                    if len(self.pending) >= 4:
                        self.h.flush()
                        self.flushed.update(self.pending)
                        for offset in self.pending:
                            self.either.pop(offset, None)
                        self.pending.clear()
                    self.h.pread(4096, self.rng.randrange(self.size // 4096) * 4096)
                    if self.broken_at is not None and self.back_at is None:
                        self.back_at = time.monotonic()
                    self.count += 1
                except nbd.Error:
                    # Unflushed writes may or may not have landed; flushed ones must have.
                    for offset, data in self.pending.items():
                        self.either.setdefault(offset, {self.flushed.pop(offset, None)}).add(data)
                    self.pending.clear()
                    if self.broken_at is None:
                        self.broken_at = time.monotonic()
                    while not self.done.is_set():
                        try:
                            self.h = self.connect()
                            break
                        except nbd.Error:
                            time.sleep(0.2)
                time.sleep(0.01)
            self.h.flush()
            self.flushed.update(self.pending)
        except Exception as err:  # noqa: BLE001 - reported by the round
            self.error = err

    def check(self, what):
        for offset, data in self.flushed.items():
            assert self.h.pread(4096, offset) == data, f"{what}: flushed write at {offset} lost"
        for offset, choices in self.either.items():
            assert None in choices or bytes(self.h.pread(4096, offset)) in choices, f"{what}: block {offset} garbled"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-timeout", help="[sessions] server_timeout (default: the server's own)")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    parser.add_argument("--agent", default=os.path.join(ROOT, "target/release/osstream-agent"))
    parser.add_argument("--s3rver", default=os.environ.get("TEST_S3RVER") or shutil.which("s3rver") or
                        os.path.expanduser("~/.cache/osstream-test/node_modules/.bin/s3rver"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="osstream-failover-")
    os.makedirs(os.path.join(work, "s3"))
    s3_port = free_port()
    s3rver = subprocess.Popen([args.s3rver, "-d", os.path.join(work, "s3"), "-a", "127.0.0.1", "-p", str(s3_port),
                               "-s", "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL)
    pg_url, stop_pg = start_postgres(work)
    ports = {name: (free_port(), free_port()) for name in SERVERS}
    timeout = f'server_timeout = "{args.server_timeout}"\n' if args.server_timeout else ""

    def config_of(name):
        nbd_port, http_port = ports[name]
        path = os.path.join(work, f"{name}.toml")
        with open(path, "w") as f:
            f.write(f'data_dir = "{work}/data-{name}"\n[demo]\ncreate = false\n'
                    f'[catalog]\nurl = "{pg_url.format(host="127.0.0.1")}"\n'
                    f'[sessions]\nshared_overlay_dir = "{work}/shared-overlays"\n{timeout}'
                    f'[cluster]\nname = "{name}"\n'
                    f'[http]\nenabled = true\nlisten = "127.0.0.1:{http_port}"\n'
                    f'[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:{nbd_port}"]\n'
                    f'[backends.store]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "failover"\n'
                    f'endpoint = "http://127.0.0.1:{s3_port}"\nregion = "us-east-1"\nlayout = "chunked"\n'
                    'writable = true\naccess_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\nallow_http = true\n')
        return path

    configs = {name: config_of(name) for name in SERVERS}

    def cli(*more):
        return subprocess.run([args.binary, "--config", configs["a"], *more], check=True, capture_output=True,
                              text=True).stdout

    try:
        cli("init")
        image = os.path.join(work, "image.raw")
        with open(image, "wb") as f:
            f.write(os.urandom(8 * MIB))
        vdisks = []
        for kind, prefix, flags in KINDS:
            name = f"{prefix}-{len(vdisks)}"
            for _ in range(50):  # s3rver takes a moment to start
                try:
                    cli("vdisk", "import", image, name, "--backend", "store", "--quiet", *flags,
                        "--boot", "linux-nbd", "--kernel", "vmlinuz", "--initrd", "initrd")
                    break
                except subprocess.CalledProcessError:
                    time.sleep(0.2)
            else:
                sys.exit("cannot import an image onto s3rver")
            mac = f"52:54:00:30:00:{len(vdisks):02x}"
            cli("client", "add", mac)
            cli("client", "assign", mac, name)
            vdisks.append((kind, name, mac))
        rows = {kind: [] for kind, *_ in vdisks}
        everyone = []
        for round_ in range(args.rounds):
            for name in SERVERS:
                shutil.rmtree(os.path.join(work, f"data-{name}"), ignore_errors=True)
            logs = {name: open(os.path.join(work, f"{name}.log"), "w") for name in SERVERS}
            servers = {name: subprocess.Popen([args.binary, "--config", configs[name], "serve"],
                                              stdout=logs[name], stderr=subprocess.STDOUT) for name in SERVERS}
            agents, clients, relay = [], [], None
            try:
                for name in SERVERS:
                    wait_http(f"http://127.0.0.1:{ports[name][1]}/servers")
                nbd_a, http_a = ports["a"]
                relay = TcpRelay(nbd_a)
                for kind, vdisk, mac in vdisks:
                    export = json.loads(cli("--json", "session", "open", mac, vdisk))["export"]
                    if kind.startswith("plain,"):
                        clients.append((kind, PlainClient(f"nbd://127.0.0.1:{relay.port}/{export}", 8 * MIB,
                                                          seed=len(clients))))
                        continue
                    token = export.split("/", 1)[1]
                    socket_path = os.path.join(work, f"{vdisk}.sock")
                    log = os.path.join(work, f"{vdisk}-{round_}.log")
                    proc = subprocess.Popen([args.agent, "run", "--nbd", f"127.0.0.1:{nbd_a}", "--export", export,
                                             "--info", f"http://127.0.0.1:{http_a}/agent/{token}",
                                             "--socket", socket_path, "--stats", log + ".stats"],
                                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
                    deadline = time.time() + 30
                    while "servers to fail over to" not in open(log).read():
                        if proc.poll() is not None or time.time() > deadline:
                            sys.exit(f"agent for {vdisk} did not start:\n{open(log).read()}")
                        time.sleep(0.1)
                    agents.append(proc)
                    clients.append((kind, Writer(socket_path, 8 * MIB, seed=len(clients))))
                for _, client in clients:
                    client.start()
                time.sleep(3)
                before = [c.count for _, c in clients]
                killed_at = time.monotonic()
                servers["a"].send_signal(signal.SIGKILL)
                servers["a"].wait()
                relay.move(ports["b"][0])
                deadline = time.time() + 120
                while not all(c.count > b + 20 for (_, c), b in zip(clients, before)):
                    failed = [f"{k}: {c.error}" for k, c in clients if c.error]
                    if failed or time.time() > deadline:
                        sys.exit("clients failed or stalled: " + "; ".join(failed or ["timeout"]))
                    time.sleep(0.05)
                all_back = time.monotonic() - killed_at
                for _, client in clients:
                    client.done.set()
                for kind, client in clients:
                    client.join(timeout=60)
                    if client.error:
                        sys.exit(f"{kind}: {client.error}")
                    client.check(None) if isinstance(client, Writer) else client.check(kind)
                    seen = (client.longest if isinstance(client, Writer) else client.back_at - killed_at)
                    rows[kind].append(seen)
                everyone.append(all_back)
                waits = ", ".join(f"{k}: {(c.longest if isinstance(c, Writer) else c.back_at - killed_at):.1f} s"
                                  for k, c in clients)
                print(f"round {round_ + 1}: every client going again {all_back:.1f} s after the kill ({waits}); "
                      f"every flushed write checked", flush=True)
            finally:
                for _, client in clients:
                    client.done.set()
                stop(agents)
                stop(list(servers.values()))
                if relay:
                    relay.close()
        told = args.server_timeout or "10s (default)"
        print(f"\nThree servers, one killed (-9) under 8 writing clients, server_timeout {told}, "
              f"reconcile_interval 2s, {args.rounds} rounds; median (max) over rounds and clients:\n")
        print("| client | interruption |")
        print("|---|---|")
        for kind, values in rows.items():
            what = "first write served again" if kind.startswith("plain,") else "longest request wait"
            print(f"| {kind} ({what}) | {statistics.median(values):.1f} s ({max(values):.1f} s) |")
        print(f"| every client going again | {statistics.median(everyone):.1f} s ({max(everyone):.1f} s) |")
        print("\nTarget: under 15 s. No peer (no other NBD server fails over); the plain clients' figures "
              "leave out keepalived's own takeover.")
    finally:
        stop([s3rver])
        stop_pg()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
