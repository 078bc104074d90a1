#!/usr/bin/env python3
"""osstream against nbdkit's file plugin, same image, same clients, one run, alternating.

Serves one image of random bytes (default 1 GiB) read-only from the page cache with
osstream and with `nbdkit file`, then runs each client A B A B... (default 5 rounds) and
prints a Markdown table of medians (min-max) and the osstream/nbdkit ratio per row.

osstream runs with its default cache configuration, as shipped: the RAM cache on, 1 GiB
capacity, 64 KiB blocks (`osstream config show`). The configuration written here sets
no cache key, so with an image of 1 GiB or more the image may not fit the cache whole:
that is measured as it is, not tuned away. Both servers are warmed by one full read of
the image first (osstream's RAM cache, the page cache under nbdkit); the RAM cache
statistics the server logs when it stops are printed at the end (stderr).

Rows: nbdcopy of the whole image (4 connections and 1), fio 4k random reads at QD32 and
QD1, 1M sequential at QD8, 4k sequential at QD1, and 4k random at QD1 through a session:
the script registers a client, a standard vdisk on the image (write cache `ram`),
assigns it and opens a session with the osstream CLI, and fio reads the session's export
(`nbd://127.0.0.1:PORT/s/TOKEN`, the path a booting client takes: catalog lookup,
per-session overlay in front of the shared base). That row's nbdkit column is the same
`nbdkit file` export as the others, so its ratio reads "session path vs nbdkit file".

The last column is a floor: `nbdkit null` of the same size (a server that does no I/O at
all) under the same fio job, run in the same alternating rounds, for the QD1 rows, where
per-request latency dominates: what the client, the kernel's loopback and one round trip
cost on this machine. The session row shares the 4k random QD1 floor (the same job).

The two "client pinned to CPU 0" rows run the same QD1 job with fio pinned to one CPU, as
a client with pinned vCPUs or I/O threads runs. On small VMs a wake-up that crosses CPUs
costs most of a QD1 round trip; unpinned, the kernel puts client and server on different
CPUs whichever server it is, and both sit at the floor. osstream serves each connection
on the CPU its requests arrive on (`[nbd] cpu_local`), so with a pinned client both stay on
one CPU; nbdkit's threads go where the scheduler puts them.

The only non-default server setting besides paths, port and log level is
`[sessions] grace`: with the default 60 s, the session (no connection between two of its
fio runs, a round apart) would end mid-benchmark.

    cargo build --release -p osstream
    python3 benches/scripts/nbd_vs_nbdkit.py [--size 1G] [--runs 5] [--runtime 10]

Needs: nbdkit, libnbd-bin (nbdcopy, nbdinfo), fio with the nbd engine (Debian's fio has it).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchlib import ROOT, fio_read, free_port, nbdcopy_seconds, parse_size, random_image, \
    standard_rows, stop, wait_port

MAC = "02:00:00:00:be:01"
VDISK = "bench-session"
RAND_QD1 = "fio rand 4k, QD1"
SEQ_QD1 = "fio seq 4k, QD1"
SESSION_QD1 = "fio rand 4k, QD1, session export"
PINNED_QD1 = "fio rand 4k, QD1, client pinned to CPU 0"
PINNED_SESSION_QD1 = "fio rand 4k, QD1, session export, client pinned to CPU 0"


def rounds(rows, runs):
    """Every row for every peer it has, alternating the peer order run by run
    (A B C, C B A...). rows: (name, unit, measure, {peer: uri}).
    Returns {row: {peer: [values]}}."""
    peers = []
    for _, _, _, uris in rows:
        peers += [p for p in uris if p not in peers]
    results = {name: {peer: [] for peer in uris} for name, _, _, uris in rows}
    for run in range(runs):
        order = peers if run % 2 == 0 else peers[::-1]
        for name, _, measure, uris in rows:
            for peer in order:
                if peer in uris:
                    results[name][peer].append(measure(uris[peer]))
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return results


def cell(values, unit):
    if not values:
        return "—"
    return f"{statistics.median(values):,.0f} {unit} ({min(values):,.0f}-{max(values):,.0f})"


def table(results, rows):
    lines = ["| test | osstream | nbdkit file | ratio | nbdkit null (floor) |", "|---|---|---|---|---|"]
    for name, unit, _, _ in rows:
        got = results[name]
        same_job = {SESSION_QD1: RAND_QD1, PINNED_SESSION_QD1: PINNED_QD1}
        floor = got.get("null") or (results[same_job[name]].get("null") if name in same_job else None)
        ratio = statistics.median(got["osstream"]) / statistics.median(got["nbdkit"])
        lines.append(f"| {name} | {cell(got['osstream'], unit)} | {cell(got['nbdkit'], unit)} | "
                     f"{ratio:.2f}x | {cell(floor, unit)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    args = parser.parse_args()
    for tool in ("nbdkit", "nbdcopy", "nbdinfo", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install nbdkit libnbd-bin fio)")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} is missing: run cargo build --release -p osstream first")

    work = tempfile.mkdtemp(prefix="osstream-bench-")
    os.makedirs(os.path.join(work, "images"))
    image = os.path.join(work, "images", "bench.img")
    size = parse_size(args.size)
    os_port, kit_port, null_port = free_port(), free_port(), free_port()
    config = os.path.join(work, "osstream.toml")
    with open(config, "w") as f:
        # No [cache] table: the cache runs as shipped.
        f.write(f'data_dir = "{work}"\n[demo]\ncreate = false\n[log]\nfilter = "info"\n'
                f'[sessions]\ngrace = "24h"\n'
                f'[nbd]\nlisten = ["127.0.0.1:{os_port}"]\n')

    def cli(*words):
        done = subprocess.run([args.binary, "--config", config, "--json", *words], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"osstream {' '.join(words)}: {done.stderr.strip()}")
        return done.stdout

    log_path = os.path.join(work, "osstream.log")
    log = open(log_path, "w")
    servers = []
    try:
        random_image(image, size)
        # The image's key on the `images` backend leaves out the extension.
        cli("init")
        cli("client", "add", MAC)
        cli("vdisk", "add", VDISK, "--backend", "images", "--key", "bench", "--write-cache", "ram")
        cli("client", "assign", MAC, VDISK)
        servers += [
            subprocess.Popen([args.binary, "--config", config, "serve"], stdout=log, stderr=subprocess.STDOUT),
            subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-r", "-p", str(kit_port),
                              "-i", "127.0.0.1", "file", image]),
            subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-r", "-p", str(null_port),
                              "-i", "127.0.0.1", "null", f"size={size}"]),
        ]
        for port in (os_port, kit_port, null_port):
            wait_port(port)
        session = json.loads(cli("session", "open", MAC, VDISK))
        os_uri = f"nbd://127.0.0.1:{os_port}"
        session_uri = f"{os_uri}/{session['export']}"
        kit_uri, null_uri = f"nbd://127.0.0.1:{kit_port}/", f"nbd://127.0.0.1:{null_port}/"
        for uri in (session_uri, null_uri):
            got = int(subprocess.run(["nbdinfo", "--size", uri], check=True, capture_output=True,
                                     text=True).stdout)
            if got != size:
                sys.exit(f"{uri} has {got} bytes, not {size}")
        for uri in (f"{os_uri}/bench", kit_uri):
            nbdcopy_seconds(uri)  # warm: osstream's RAM cache, nbdkit's page cache

        def qd1(rw, cpu=None):
            return lambda u: fio_read(u, rw, "4k", 1, args.runtime, cpu)["iops"]

        pair = {"osstream": f"{os_uri}/bench", "nbdkit": kit_uri}
        rows = [(name, unit, measure, pair) for name, unit, measure in standard_rows(size, args.runtime)]
        rows = [(n, u, m, {**p, "null": null_uri}) if n == RAND_QD1 else (n, u, m, p) for n, u, m, p in rows]
        rows += [
            (SEQ_QD1, "IOPS", qd1("read"), {**pair, "null": null_uri}),
            (SESSION_QD1, "IOPS", qd1("randread"), {"osstream": session_uri, "nbdkit": kit_uri}),
            (PINNED_QD1, "IOPS", qd1("randread", 0), {**pair, "null": null_uri}),
            (PINNED_SESSION_QD1, "IOPS", qd1("randread", 0), {"osstream": session_uri, "nbdkit": kit_uri}),
        ]
        results = rounds(rows, args.runs)
        listed = json.loads(cli("session", "list"))
        mine = next((s for s in listed if s["id"] == session["id"]), None)
        print(f"session {session['id']} ({session['export'][:10]}...): "
              + (f"{mine['bytes_read'] / (1 << 20):,.0f} MiB read through it" if mine else "gone!"),
              file=sys.stderr)
        print(f"\nImage {args.size} random, osstream's default RAM cache, {args.runs} runs alternating, "
              f"{args.runtime} s per fio job, medians (min-max); floor = nbdkit null, same fio job:\n")
        print(table(results, rows))
    finally:
        stop(servers)
        log.close()
        with open(log_path) as f:
            for line in f:
                if "cache statistics" in line or " ERROR " in line or " WARN " in line:
                    print("osstream: " + line.rstrip(), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
