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
import os
import shutil
import subprocess
import sys
import tempfile

from benchlib import ROOT, alternate, free_port, nbdcopy_seconds, parse_size, random_image, \
    standard_rows, stop, table, wait_port


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    args = parser.parse_args()
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install nbdkit libnbd-bin fio)")
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} is missing: run cargo build --release first")

    work = tempfile.mkdtemp(prefix="osstream-bench-")
    os.makedirs(os.path.join(work, "images"))
    image = os.path.join(work, "images", "bench.img")
    size = parse_size(args.size)
    random_image(image, size)
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
            nbdcopy_seconds(uri)  # warm: osstream's RAM cache, nbdkit's page cache
        rows = standard_rows(size, args.runtime)
        results = alternate(peers, rows, args.runs)
        print(f"\nImage {args.size} random, {args.runs} runs alternating, medians (min-max):\n")
        print(table(results, rows, "osstream", "nbdkit", "osstream", "nbdkit file"))
    finally:
        stop(servers)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
