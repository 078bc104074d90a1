"""Shared helpers for the peer-comparison scripts: ports, images, clients, tables."""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def random_image(path, size):
    """Random bytes (zeros would flatter sparse-aware servers), then read once so the
    page cache holds it."""
    with open("/dev/urandom", "rb") as src, open(path, "wb") as dst:
        left = size
        while left:
            chunk = src.read(min(left, 1 << 24))
            dst.write(chunk)
            left -= len(chunk)
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def nbdcopy_seconds(uri, conns=None):
    args = ["nbdcopy", uri, "null:"] + ([f"--connections={conns}"] if conns else [])
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - start


def fio_read(uri, rw, bs, depth, runtime, cpu=None):
    """fio's nbd engine; returns the job's read statistics. With `cpu`, fio runs pinned to
    that CPU (as a client with pinned vCPUs or I/O threads would)."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    out = subprocess.run(
        pin + ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={depth}", "--time_based", f"--runtime={runtime}", "--ramp_time=1",
         "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]


def standard_rows(size, runtime):
    """The five rows of BENCHMARKS.md: (name, unit, measure(uri) -> value)."""
    mib = size / (1 << 20)
    return [
        ("nbdcopy whole image, default (4 conns)", "MiB/s", lambda u: mib / nbdcopy_seconds(u)),
        ("nbdcopy whole image, -C 1", "MiB/s", lambda u: mib / nbdcopy_seconds(u, 1)),
        ("fio rand 4k, QD32", "IOPS", lambda u: fio_read(u, "randread", "4k", 32, runtime)["iops"]),
        ("fio rand 4k, QD1", "IOPS", lambda u: fio_read(u, "randread", "4k", 1, runtime)["iops"]),
        ("fio seq 1M, QD8", "MiB/s", lambda u: fio_read(u, "read", "1M", 8, runtime)["bw"] / 1024),
    ]


def alternate(peers, rows, runs):
    """Runs every row for every peer, alternating the peer order run by run (A B, B A...).
    Returns {row: {peer: [values]}}."""
    results = {name: {peer: [] for peer in peers} for name, _, _ in rows}
    for run in range(runs):
        order = list(peers) if run % 2 == 0 else list(reversed(list(peers)))
        for name, _, measure in rows:
            for peer in order:
                results[name][peer].append(measure(peers[peer]))
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return results


def table(results, rows, first, second, first_label, second_label):
    """A Markdown table of medians (min-max) and the first/second ratio."""
    lines = [f"| test | {first_label} | {second_label} | ratio |", "|---|---|---|---|"]
    for name, unit, _ in rows:
        a, b = results[name][first], results[name][second]
        ma, mb = statistics.median(a), statistics.median(b)
        lines.append(f"| {name} | {ma:,.0f} {unit} ({min(a):,.0f}-{max(a):,.0f}) | "
                     f"{mb:,.0f} {unit} ({min(b):,.0f}-{max(b):,.0f}) | {ma / mb:.2f}x |")
    return "\n".join(lines)


def stop(processes):
    for proc in processes:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def load_trace(path):
    """A boot trace (benches/traces): the image size and its reads (at µs, offset, length)."""
    reads, size = [], 0
    for line in open(path):
        if line.startswith("#"):
            for field in line.split():
                if field.startswith("size="):
                    size = int(field[5:])
            continue
        at, offset, length = map(int, line.split())
        reads.append((at, offset, length))
    return size, reads


def replay(uri, reads, done, index, errors, gaps=True):
    """One simulated client: each read of the trace once the previous one returned (queue
    depth 1, as a boot), after the pause the trace recorded unless not `gaps`; its time
    goes to done[index], a failure to `errors`. Needs python3-libnbd."""
    import nbd
    try:
        h = nbd.NBD()
        h.connect_uri(uri)
        started = time.perf_counter()
        previous = reads[0][0]
        for at, offset, length in reads:
            gap = (at - previous) / 1e6
            previous = at
            if gaps and gap > 0:
                time.sleep(gap)
            h.pread(length, offset)
        done[index] = time.perf_counter() - started
        h.shutdown()
    except Exception as err:  # reported by the caller
        errors.append(f"client {index}: {err}")
