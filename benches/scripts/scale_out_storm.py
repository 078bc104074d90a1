#!/usr/bin/env python3
"""Boot storm against one server and against three (issue 17): N simulated clients replay a
recorded boot at once, every session placed by the servers themselves, each server in a
network namespace of its own behind its own rate-limited link. One run, alternating.

Sets up, for each server i of three, a namespace `osstream-so<i>` joined to this one by a
veth pair (10.88.<i>.1 here, 10.88.<i>.2 in the namespace) with `tc tbf` at --rate in
both directions: the CPU is shared here, the links model separate machines. Starts one
PostgreSQL (the shared catalog) and s3rver (the shared store) here, uploads a random image
of the trace's size, registers N clients, and each round starts fresh servers (RAM caches
cold, no profile): only server 1 for "one", all three for "three". Every client then boots
as an iPXE client would: `GET /ipxe/MAC` from server 1, which places the session and names
the server in the script's `nbdroot=`; then every client replays the trace over NBD
(python3-libnbd) against that server at once, one request at a time, without the
recorded pauses between reads (--gaps keeps them: then the links are rarely full).

Reported: the last client's time for one and three servers, their ratio (target: three at
most half of one), where the sessions went, and per server what the backend read against
the distinct blocks the trace touches (each at most once per server is the target).

With --hog, two more storms run on the one server each round, beside one more client
that reads the whole disk over and over (nbdcopy, 4 connections) through its session:
once unlimited, once with its group limited by `[limits]` (--hog-limit, default 5MiB).
The storm is bound by the server's link, so this shows what one greedy client takes from
a boot storm and what a limit gives back (the unlimited hog itself is bound by how fast
s3rver serves the blocks the RAM cache does not hold).

Needs root (namespaces, tc) and Debian's /usr/bin/python3 (python3-libnbd):

    cargo build --release
    /usr/bin/python3 benches/scripts/scale_out_storm.py [--clients 60] [--rate 1gbit] [--rounds 2] [--hog]
"""

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from benchlib import ROOT, free_port, load_trace, replay, stop
from boot_storm import hog

BUCKET = "vdisks"
BLOCK = 64 << 10
SERVERS = 3
HTTP_PORT, NBD_PORT = 8080, 10809


def host(i):
    """This namespace's end of server i's link."""
    return f"10.88.{i}.1"


def server_ip(i):
    return f"10.88.{i}.2"


def namespace(i):
    return f"osstream-so{i}"


def sh(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def tear_down_links():
    for i in range(1, SERVERS + 1):
        subprocess.run(["ip", "netns", "del", namespace(i)], capture_output=True)
        subprocess.run(["ip", "link", "del", f"so-h{i}"], capture_output=True)


def set_up_links(rate):
    tear_down_links()
    for i in range(1, SERVERS + 1):
        ns, outside, inside = namespace(i), f"so-h{i}", f"so-s{i}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "addr", "add", f"{host(i)}/24", "dev", outside)
        sh("ip", "link", "set", outside, "up")
        sh("ip", "-n", ns, "addr", "add", f"{server_ip(i)}/24", "dev", inside)
        sh("ip", "-n", ns, "link", "set", inside, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", host(i))
        # Both directions: data to the clients leaves through `inside`, the store's
        # bytes reach the server through `outside`.
        for prefix, dev in (([], outside), (["ip", "netns", "exec", ns], inside)):
            sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "1mb",
               "latency", "50ms")


def start_postgres(work):
    """A throwaway PostgreSQL cluster every namespace reaches; returns (url template, stop)."""
    bin_dir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    root = tempfile.mkdtemp(prefix="osstream-pg-")
    port = free_port()
    prefix = ["runuser", "-u", "postgres", "--"]
    sh("chown", "postgres:postgres", root)
    data = os.path.join(root, "data")
    subprocess.run(prefix + [f"{bin_dir}/initdb", "-D", data, "-A", "trust", "-U", "osstream", "--no-sync"],
                   check=True, capture_output=True)
    with open(os.path.join(data, "pg_hba.conf"), "a") as f:
        f.write("host all all 10.88.0.0/16 trust\n")
    subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses=* -c fsync=off -c max_connections=300",
                             "start"], check=True, capture_output=True)

    def halt():
        subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    return "postgres://osstream@{host}:" + str(port) + "/postgres", halt


def wait_http(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers at {url}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=os.path.join(ROOT, "benches", "traces", "debian12-multiuser-1.trace"))
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--rate", default="1gbit", help="each server's link, both directions (tc tbf rate)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gaps", action="store_true", help="keep the pauses the trace recorded between reads")
    parser.add_argument("--hog", action="store_true", help="also run storms on one server beside a client reading "
                        "the whole disk, unlimited and limited")
    parser.add_argument("--hog-limit", default="5MiB", help="[limits] bandwidth of the hog's group")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    parser.add_argument("--s3rver", default=os.environ.get("TEST_S3RVER") or shutil.which("s3rver") or
                        os.path.expanduser("~/.cache/osstream-test/node_modules/.bin/s3rver"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("scale_out_storm.py needs root: it creates network namespaces and tc qdiscs")
    size, reads = load_trace(args.trace)
    distinct = {b for _, o, n in reads for b in range(o // BLOCK, (o + n - 1) // BLOCK + 1)}
    work = tempfile.mkdtemp(prefix="osstream-scale-")
    os.makedirs(os.path.join(work, "s3"))
    image = os.path.join(work, "os.img")
    with open(image, "wb") as f:
        f.truncate(size)
    # Random bytes where the trace reads, so nothing is an all-zero shortcut.
    with open(image, "r+b") as f:
        for block in distinct:
            f.seek(block * BLOCK)
            f.write(os.urandom(min(BLOCK, size - block * BLOCK)))
    s3_port = free_port()
    set_up_links(args.rate)
    s3rver = subprocess.Popen([args.s3rver, "-d", os.path.join(work, "s3"), "-a", "0.0.0.0", "-p", str(s3_port),
                               "-s", "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL)
    pg_url, stop_pg = start_postgres(work)
    try:
        def config_of(i, limits=""):
            """Server i's configuration file; server 0 is the admin's view from here."""
            reach = "127.0.0.1" if i == 0 else host(i)
            path = os.path.join(work, f"osstream-{i}.toml")
            listen = server_ip(i) if i else "127.0.0.1"
            with open(path, "w") as f:
                f.write(f'data_dir = "{work}/data-{i}"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                        f'[catalog]\nurl = "{pg_url.format(host=reach)}"\n'
                        '[profile]\nrecord = false\nprefetch = false\n'
                        f'[cluster]\nname = "s{i}"\n'
                        f'[http]\nenabled = true\nlisten = "{listen}:{HTTP_PORT}"\n'
                        f'[nbd]\nbase_exports = false\nlisten = ["{listen}:{NBD_PORT}"]\n'
                        f'[backends.store]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "storm"\n'
                        f'endpoint = "http://{reach}:{s3_port}"\nregion = "us-east-1"\n'
                        'access_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\nallow_http = true\n'
                        + limits)
            return path

        admin = config_of(0)

        def cli(*more, config=admin):
            return subprocess.run([args.binary, "--config", config, *more], check=True, capture_output=True,
                                  text=True).stdout

        cli("init")
        for _ in range(50):  # s3rver takes a moment
            try:
                cli("vdisk", "import", image, "os", "--backend", "store", "--quiet")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        else:
            sys.exit("cannot import the image onto s3rver")
        cli("vdisk", "set", "os", "--boot", "linux-nbd", "--kernel", "vmlinuz", "--initrd", "initrd.img")
        macs = [f"52:54:00:20:{n // 256:02x}:{n % 256:02x}" for n in range(args.clients)]
        for mac in macs:
            cli("client", "add", mac)
            cli("client", "assign", mac, "os")
        hog_mac = "52:54:00:99:00:01"
        cli("client", "add", hog_mac, "--group", "bulk")
        cli("client", "assign", hog_mac, "os")
        kinds = [("one", 1), ("three", SERVERS)]
        if args.hog:
            kinds += [("one+hog", 1), ("one+hog limited", 1)]
        results = {kind: [] for kind, _ in kinds}
        hogged = {kind: [] for kind, _ in kinds}
        for round_ in range(args.rounds):
            for kind, count in kinds:
                limits = f'[limits.groups.bulk]\nbandwidth = "{args.hog_limit}"\n' if "limited" in kind else ""
                configs = [config_of(i, limits) for i in range(1, count + 1)]
                for i in range(1, count + 1):
                    shutil.rmtree(os.path.join(work, f"data-{i}"), ignore_errors=True)
                servers = [subprocess.Popen(["ip", "netns", "exec", namespace(i), args.binary, "--config",
                                             configs[i - 1], "serve"]) for i in range(1, count + 1)]
                try:
                    for i in range(1, count + 1):
                        wait_http(f"http://{server_ip(i)}:{HTTP_PORT}/servers")
                    # Every server's first heartbeat is in before the first boot.
                    deadline = time.time() + 20
                    while len(json.loads(urllib.request.urlopen(
                            f"http://{server_ip(1)}:{HTTP_PORT}/servers").read())["servers"]) < count:
                        if time.time() > deadline:
                            sys.exit("the servers did not all register")
                        time.sleep(0.2)
                    uris, placed = [], {}
                    for mac in macs:
                        script = urllib.request.urlopen(
                            f"http://{server_ip(1)}:{HTTP_PORT}/ipxe/{mac}", timeout=20).read().decode()
                        found = re.search(r"nbdroot=([0-9.]+):(\d+)/(\S+)", script)
                        if not found:
                            sys.exit(f"no nbdroot= in the boot script of {mac}:\n{script}")
                        address, port, export = found.groups()
                        placed[address] = placed.get(address, 0) + 1
                        uris.append(f"nbd://{address}:{port}/{export}")
                    stop_hog, copies, hog_thread = threading.Event(), [], None
                    if "hog" in kind:
                        export = json.loads(cli("--json", "session", "open", hog_mac, "os"))["export"]
                        hog_uri = f"nbd://{server_ip(1)}:{NBD_PORT}/{export}"
                        hog_thread = threading.Thread(target=hog, args=(hog_uri, stop_hog, copies))
                        hog_thread.start()
                        time.sleep(1)  # the hog is reading when the storm starts
                    done, errors = [None] * len(uris), []
                    threads = [threading.Thread(target=replay, args=(uri, reads, done, i, errors, args.gaps))
                               for i, uri in enumerate(uris)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    stop_hog.set()
                    if errors:
                        sys.exit("\n".join(errors[:5]))
                finally:
                    stop_hog.set()
                    stop(servers)
                if hog_thread:
                    hog_thread.join()
                hogged[kind].append(len(copies))
                backend = []
                for config in configs:
                    stats = json.loads(cli("--json", "cache", "stats", config=config))
                    ram = {l["layer"]: dict(l["counters"]) for l in stats["layers"]}["cache:ram"]
                    backend.append(ram["misses"])
                results[kind].append((max(done), backend))
                where = ", ".join(f"{a}: {n}" for a, n in sorted(placed.items()))
                print(f"round {round_ + 1} {kind:<5}: last done {max(done):5.1f} s, median "
                      f"{statistics.median(done):5.1f} s; sessions {where}; backend read "
                      f"{backend} blocks per server; trace touches {len(distinct)} blocks", flush=True)
        one = statistics.median(r[0] for r in results["one"])
        three = statistics.median(r[0] for r in results["three"])
        pacing = "as recorded" if args.gaps else "back to back (no recorded pauses)"
        print(f"\n{os.path.basename(args.trace)}, {args.clients} clients at once, reads {pacing}, each server "
              f"behind {args.rate} both ways, caches cold, {args.rounds} rounds alternating, medians:\n")
        print("| storm | last client done | most backend blocks one server read / distinct blocks | "
              "whole-disk copies by the hog |")
        print("|---|---|---|---|")
        for kind, count in kinds:
            last = statistics.median(r[0] for r in results[kind])
            most = max(max(r[1]) for r in results[kind])
            copies = statistics.median(hogged[kind]) if "hog" in kind else "-"
            print(f"| {kind} ({count} server{'s' if count > 1 else ''}) | {last:.1f} s | {most} / {len(distinct)} "
                  f"({most / len(distinct):.2f}x) | {copies} |")
        print(f"\nthree / one: {three / one:.2f}x (target: at most 0.50x)")
        if args.hog:
            for kind in ("one+hog", "one+hog limited"):
                last = statistics.median(r[0] for r in results[kind])
                print(f"{kind} / one: {last / one:.2f}x" + (f" (hog limit {args.hog_limit}/s)" if "limited" in kind
                                                             else ""))
    finally:
        stop([s3rver])
        stop_pg()
        tear_down_links()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
