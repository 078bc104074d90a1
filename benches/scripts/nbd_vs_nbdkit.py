#!/usr/bin/env python3
"""osstream against nbdkit's file plugin, same image, same clients, one run, alternating.

Serves one image of random bytes (default 1 GiB) read-only from the page cache with
osstream (RAM cache on, warmed) and with `nbdkit file`, then runs each client A B A B...
and prints a Markdown table of medians and the osstream/nbdkit ratio per row.

    cargo build --release
    python3 benches/scripts/nbd_vs_nbdkit.py [--size 1G] [--runs 5] [--runtime 10]

Needs: nbdkit, libnbd-bin (nbdcopy), fio with the nbd engine (Debian's fio has it).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def nbdcopy(uri, conns):
    args = ["nbdcopy", uri, "null:"] + ([f"--connections={conns}"] if conns else [])
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def fio(uri, rw, bs, depth, runtime):
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={depth}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
         "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    return job


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install nbdkit libnbd-bin fio)")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} is missing: run cargo build --release first")

    work = tempfile.mkdtemp(prefix="osstream-bench-")
    images = os.path.join(work, "images")
    os.makedirs(images)
    image = os.path.join(images, "bench.img")
    size = parse_size(args.size)
    with open("/dev/urandom", "rb") as src, open(image, "wb") as dst:
        left = size
        while left:
            chunk = src.read(min(left, 1 << 24))
            dst.write(chunk)
            left -= len(chunk)
    subprocess.run(["cat", image], stdout=subprocess.DEVNULL, check=True)  # page cache

    os_port, kit_port = free_port(), free_port()
    config = os.path.join(work, "osstream.toml")
    with open(config, "w") as f:
        f.write(f'data_dir = "{work}"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                f'[cache.ram]\ncapacity = "{max(2 * size, 1 << 30)}"\n'
                f'[nbd]\nlisten = ["127.0.0.1:{os_port}"]\n')
    servers = [
        subprocess.Popen([args.binary, "--config", config, "serve"]),
        subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-r", "-p", str(kit_port),
                          "-i", "127.0.0.1", "file", image]),
    ]
    try:
        wait_port(os_port)
        wait_port(kit_port)
        peers = {"osstream": f"nbd://127.0.0.1:{os_port}/bench", "nbdkit": f"nbd://127.0.0.1:{kit_port}/"}
        for uri in peers.values():
            nbdcopy(uri, None)  # warm: osstream's RAM cache, nbdkit's page cache
        mib = size / (1 << 20)
        rows = [
            ("nbdcopy whole image, default (4 conns)", "MiB/s", lambda u: mib / nbdcopy(u, None)),
            ("nbdcopy whole image, -C 1", "MiB/s", lambda u: mib / nbdcopy(u, 1)),
            ("fio rand 4k, QD32", "IOPS", lambda u: fio(u, "randread", "4k", 32, args.runtime)["iops"]),
            ("fio rand 4k, QD1", "IOPS", lambda u: fio(u, "randread", "4k", 1, args.runtime)["iops"]),
            ("fio seq 1M, QD8", "MiB/s", lambda u: fio(u, "read", "1M", 8, args.runtime)["bw"] / 1024),
        ]
        results = {name: {peer: [] for peer in peers} for name, _, _ in rows}
        for run in range(args.runs):
            order = list(peers) if run % 2 == 0 else list(reversed(peers))
            for name, _, measure in rows:
                for peer in order:
                    results[name][peer].append(measure(peers[peer]))
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
        print(f"\nImage {args.size} random, {args.runs} runs alternating, medians (min-max):\n")
        print("| test | osstream | nbdkit file | ratio |")
        print("|---|---|---|---|")
        for name, unit, _ in rows:
            a, b = results[name]["osstream"], results[name]["nbdkit"]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {name} | {ma:,.0f} {unit} ({min(a):,.0f}-{max(a):,.0f}) | "
                  f"{mb:,.0f} {unit} ({min(b):,.0f}-{max(b):,.0f}) | {ma / mb:.2f}x |")
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
