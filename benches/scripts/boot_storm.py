#!/usr/bin/env python3
"""Boot storm: simulated clients replay a recorded boot against one vdisk at once, with
the vdisk on S3 behind a delay, the server's caches cold. One run, alternating.

Starts s3rver on loopback and a proxy adding a fixed delay to every S3 request
(tests/python/faultproxy.py), uploads a random image of the trace's size, registers N
clients, and for each round starts a fresh osstream (RAM cache cold, no profile), opens
a session per client and has every client replay the trace over NBD (python3-libnbd):
each read when the previous one has returned plus the gap the trace recorded between
them (queue depth 1, as a boot). Reported: the lone client's time, the last of N
clients' time, their ratio, and what the backend read against the distinct blocks the
trace touches (each at most once is the target; hedged duplicates counted apart).

With --hog, two more storms run each round beside one more client that reads the whole
disk over and over (nbdcopy, 4 connections) while the others boot: once unlimited and
once with that client's group limited by `[limits]` (--hog-limit), to show what one
greedy client does to a boot storm and what a limit gives back.

    cargo build --release
    python3 benches/scripts/boot_storm.py [--clients 60] [--delay-ms 10] [--rounds 2] [--hog]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import ROOT, free_port, load_trace, replay, stop, wait_port

sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from faultproxy import FaultyProxy  # noqa: E402

BUCKET = "vdisks"
BLOCK = 64 << 10


def hog(uri, stop_at, copied):
    """Reads the whole disk again and again until `stop_at` is set; counts the bytes."""
    while not stop_at.is_set():
        started = time.perf_counter()
        out = subprocess.run(["nbdcopy", "--connections=4", "--flush", uri, "null:"], capture_output=True, text=True)
        if out.returncode != 0:
            if not stop_at.is_set():
                print(f"hog: {out.stderr.strip()}", file=sys.stderr)
            return
        copied.append(time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=os.path.join(ROOT, "benches", "traces", "debian12-multiuser-1.trace"))
    parser.add_argument("--clients", type=int, default=60)
    parser.add_argument("--delay-ms", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    parser.add_argument("--hog", action="store_true", help="also run storms beside a client reading the whole disk")
    parser.add_argument("--hog-limit", default="20MiB", help="[limits] bandwidth of the hog's group")
    parser.add_argument("--s3rver", default=os.environ.get("TEST_S3RVER") or shutil.which("s3rver") or
                        os.path.expanduser("~/.cache/osstream-test/node_modules/.bin/s3rver"))
    args = parser.parse_args()
    size, reads = load_trace(args.trace)
    distinct = {b for _, o, n in reads for b in range(o // BLOCK, (o + n - 1) // BLOCK + 1)}
    work = tempfile.mkdtemp(prefix="osstream-storm-")
    os.makedirs(os.path.join(work, "s3"))
    image = os.path.join(work, "os.img")
    with open(image, "wb") as f:
        f.truncate(size)
    s3_port, nbd_port = free_port(), free_port()
    s3rver = subprocess.Popen([args.s3rver, "-d", os.path.join(work, "s3"), "-a", "127.0.0.1", "-p", str(s3_port),
                               "-s", "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL)
    proxy = None
    try:
        wait_port(s3_port)
        # Random bytes where the trace reads, so nothing is an all-zero shortcut.
        with open(image, "r+b") as f:
            for block in distinct:
                f.seek(block * BLOCK)
                f.write(os.urandom(min(BLOCK, size - block * BLOCK)))
        proxy = FaultyProxy(s3_port, delay=args.delay_ms / 1000)
        config = os.path.join(work, "osstream.toml")
        def write_config(limits=""):
            with open(config, "w") as f:
                f.write(f'data_dir = "{work}/data"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                        '[profile]\nrecord = false\nprefetch = false\n'
                        f'[nbd]\nlisten = ["127.0.0.1:{nbd_port}"]\n'
                        + "".join(f'[backends.{name}]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "storm"\n'
                                  f'endpoint = "http://127.0.0.1:{port}"\nregion = "us-east-1"\n'
                                  'access_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\nallow_http = true\n'
                                  for name, port in (("direct", s3_port), ("far", proxy.port)))
                        + limits)

        write_config()

        def cli(*more):
            return subprocess.run([args.binary, "--config", config, *more], check=True, capture_output=True,
                                  text=True).stdout

        cli("init")
        cli("vdisk", "import", image, "os", "--backend", "direct", "--quiet")
        cli("vdisk", "add", "storm", "--backend", "far", "--key", "os")
        macs = [f"52:54:00:10:{n // 256:02x}:{n % 256:02x}" for n in range(args.clients)]
        for mac in macs:
            cli("client", "add", mac)
            cli("client", "assign", mac, "storm")
        hog_mac = "52:54:00:99:00:01"
        cli("client", "add", hog_mac, "--group", "bulk")
        cli("client", "assign", hog_mac, "storm")
        kinds = [("lone", 1), ("storm", args.clients)]
        if args.hog:
            kinds += [("storm+hog", args.clients), ("storm+hog limited", args.clients)]
        results = {kind: [] for kind, _ in kinds}
        backend = {kind: [] for kind, _ in kinds}
        hogged = {kind: [] for kind, _ in kinds}
        for round_ in range(args.rounds):
            for kind, count in kinds:
                limited = kind.endswith("limited")
                write_config(f'[limits.groups.bulk]\nbandwidth = "{args.hog_limit}"\n' if limited else "")
                server = subprocess.Popen([args.binary, "--config", config, "serve"])
                try:
                    wait_port(nbd_port)
                    uris = [cli("session", "open", mac, "storm").strip() for mac in macs[:count]]
                    done, errors = [None] * count, []
                    threads = [threading.Thread(target=replay, args=(uri, reads, done, i, errors))
                               for i, uri in enumerate(uris)]
                    stop_hog, copies = threading.Event(), []
                    hog_thread = None
                    if "hog" in kind:
                        hog_uri = cli("session", "open", hog_mac, "storm").strip()
                        hog_thread = threading.Thread(target=hog, args=(hog_uri, stop_hog, copies))
                        hog_thread.start()
                        time.sleep(1)  # the hog is reading when the storm starts
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    stop_hog.set()
                    if errors:
                        sys.exit("\n".join(errors[:5]))
                finally:
                    stop([server])
                if hog_thread:
                    hog_thread.join()
                hogged[kind].append(len(copies))
                stats = json.loads(cli("--json", "cache", "stats"))
                layers = {l["layer"]: dict(l["counters"]) for l in stats["layers"]}
                ram, hedge = layers["cache:ram"], layers.get("hedge", {})
                results[kind].append(max(done))
                backend[kind].append((ram["misses"], ram["backend_bytes"], hedge.get("hedged", 0)))
                print(f"round {round_ + 1} {kind:<5} ({count:>2} clients): last done {max(done):5.1f} s, "
                      f"median {statistics.median(done):5.1f} s; backend read {ram['misses']} blocks "
                      f"({ram['backend_bytes'] / 2**20:.1f} MiB) in {ram['backend_reads']} reads, "
                      f"{hedge.get('hedged', 0)} hedged; trace touches {len(distinct)} blocks", flush=True)
        lone, storm = statistics.median(results["lone"]), statistics.median(results["storm"])
        print(f"\n{os.path.basename(args.trace)}, {args.clients} clients at once, S3 + {args.delay_ms:g} ms per "
              f"request, caches cold, {args.rounds} rounds alternating, medians:\n")
        print("| run | clients | last client done | backend blocks read / distinct blocks | hedged reads |"
              " whole-disk copies by the hog |")
        print("|---|---|---|---|---|---|")
        for kind, count in kinds:
            blocks = statistics.median(b[0] for b in backend[kind])
            hedged = statistics.median(b[2] for b in backend[kind])
            copies = statistics.median(hogged[kind]) if "hog" in kind else "-"
            print(f"| {kind} | {count} | {statistics.median(results[kind]):.1f} s | {blocks:.0f} / {len(distinct)} "
                  f"({blocks / len(distinct):.2f}x) | {hedged:.0f} | {copies} |")
        print(f"\nlast of {args.clients} / lone: {storm / lone:.2f}x")
        if args.hog:
            for kind in ("storm+hog", "storm+hog limited"):
                print(f"{kind} / storm: {statistics.median(results[kind]) / storm:.2f}x "
                      f"(hog limit {args.hog_limit}/s)" if "limited" in kind else
                      f"{kind} / storm: {statistics.median(results[kind]) / storm:.2f}x")
    finally:
        if proxy:
            proxy.close()
        stop([s3rver])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
