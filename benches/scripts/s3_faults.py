#!/usr/bin/env python3
"""Tail-tolerant reads: an S3 vdisk read through a proxy that injects faults, with hedged
backend reads on and off, alternating, one run.

Starts s3rver on loopback, uploads a random image (default 128 MiB) with
`osstream vdisk import`, and puts a fault proxy in front of s3rver that answers a share
of GETs with HTTP 500 (default 10 %), cuts a share of bodies short (2 %) and stalls a
share for six seconds before closing (2 %). Each run starts a fresh osstream (default
options, RAM cache on) whose backend reads through the proxy, copies the vdisk with
`nbdcopy` (default options) and checks it byte for byte; `[hedge] enabled` alternates
between true and false. Prints the time of each run, the medians, and how many reads
were hedged (from `osstream cache stats`).

    cargo build --release
    python3 benches/scripts/s3_faults.py [--size 128M] [--rounds 3]

Needs: s3rver (set TEST_S3RVER or pass --s3rver), libnbd-bin (nbdcopy).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import ROOT, free_port, parse_size, random_image, stop, wait_port

sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
from faultproxy import FaultyProxy  # noqa: E402

BUCKET = "vdisks"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def chooser(seed, errors, short, stalls):
    rng = random.Random(seed)

    def choose(n, command):
        if command != "GET":
            return None
        roll = rng.random()
        if roll < errors:
            return "500"
        if roll < errors + short:
            return "short"
        if roll < errors + short + stalls:
            return "stall"
        return None
    return choose


def backend(name, port):
    return (f'[backends.{name}]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "bench"\n'
            f'endpoint = "http://127.0.0.1:{port}"\nregion = "us-east-1"\n'
            f'access_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\nallow_http = true\n')


def one_run(args, work, s3_port, hedge, seed, want):
    proxy = FaultyProxy(s3_port, stall=args.stall, choose=chooser(seed, args.errors, args.short, args.stalls))
    port = free_port()
    data = os.path.join(work, f"run-{seed}")
    config = os.path.join(work, f"run-{seed}.toml")
    with open(config, "w") as f:
        f.write(f'data_dir = "{data}"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                f'[hedge]\nenabled = {str(hedge).lower()}\n[nbd]\nlisten = ["127.0.0.1:{port}"]\n'
                + backend("faulty", proxy.port))
    server = subprocess.Popen([args.binary, "--config", config, "serve"])
    try:
        wait_port(port)
        out = os.path.join(work, "copy.raw")
        started = time.perf_counter()
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/os", out], check=True)
        seconds = time.perf_counter() - started
        exact = sha256(out) == want
        os.remove(out)
    finally:
        stop([server])
        proxy.close()
    stats = json.loads(subprocess.run([args.binary, "--config", config, "--json", "cache", "stats"],
                                      check=True, capture_output=True, text=True).stdout)
    hedge_counts = next((dict(l["counters"]) for l in stats["layers"] if l["layer"] == "hedge"), {})
    return seconds, exact, dict(proxy.injected), hedge_counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="128M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--errors", type=float, default=0.10)
    parser.add_argument("--short", type=float, default=0.02)
    parser.add_argument("--stalls", type=float, default=0.02)
    parser.add_argument("--stall", type=float, default=6.0, help="seconds a stalled request hangs")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    parser.add_argument("--s3rver", default=os.environ.get("TEST_S3RVER") or shutil.which("s3rver") or
                        os.path.expanduser("~/.cache/osstream-test/node_modules/.bin/s3rver"))
    args = parser.parse_args()
    for path, hint in ((args.binary, "run cargo build --release first"), (args.s3rver, "npm install s3rver@3")):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: {hint}")

    work = tempfile.mkdtemp(prefix="osstream-faults-")
    os.makedirs(os.path.join(work, "s3"))
    image = os.path.join(work, "os.img")
    random_image(image, parse_size(args.size))
    want = sha256(image)
    s3_port = free_port()
    s3rver = subprocess.Popen([args.s3rver, "-d", os.path.join(work, "s3"), "-a", "127.0.0.1", "-p", str(s3_port),
                               "-s", "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL)
    try:
        wait_port(s3_port)
        upload = os.path.join(work, "upload.toml")
        with open(upload, "w") as f:
            f.write(f'data_dir = "{work}/upload"\n[demo]\ncreate = false\n' + backend("direct", s3_port))
        subprocess.run([args.binary, "--config", upload, "vdisk", "import", image, "os", "--backend", "direct",
                        "--quiet"], check=True)
        results = {True: [], False: []}
        seed = 0
        for round_ in range(args.rounds):
            for hedge in (True, False):
                seed += 1
                seconds, exact, injected, counts = one_run(args, work, s3_port, hedge, seed, want)
                results[hedge].append(seconds)
                print(f"round {round_ + 1} hedge={'on ' if hedge else 'off'}: {seconds:6.1f} s "
                      f"{'byte-exact' if exact else 'WRONG BYTES'}; injected {injected}; "
                      f"hedged {counts.get('hedged', 0)} of {counts.get('reads', 0)} reads "
                      f"(second won {counts.get('hedge_won', 0)}, over budget {counts.get('over_budget', 0)})",
                      flush=True)
                if not exact:
                    sys.exit("a copy was not byte-exact")
        on, off = statistics.median(results[True]), statistics.median(results[False])
        print(f"\n{args.size} vdisk on s3rver behind the fault proxy ({args.errors:.0%} HTTP 500, "
              f"{args.short:.0%} short bodies, {args.stalls:.0%} {args.stall:.0f}-s stalls), nbdcopy, "
              f"{args.rounds} rounds alternating, medians:\n")
        print("| hedged reads | seconds (min-max) |")
        print("|---|---|")
        for label, hedge in (("on (default)", True), ("off", False)):
            times = results[hedge]
            print(f"| {label} | {statistics.median(times):.1f} ({min(times):.1f}-{max(times):.1f}) |")
        print(f"\nhedging on: {off / on:.1f}x faster")
    finally:
        stop([s3rver])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
