#!/usr/bin/env python3
"""What each write-overlay kind costs per written GiB: server RAM (RSS growth) and server
disk (allocated bytes of the overlay folder), measured by writing random data through a
session with nbdcopy.

    cargo build --release
    python3 benches/scripts/overlay_cost.py [--write 256M]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchlib import ROOT, free_port, parse_size, random_image, stop, wait_port

KINDS = ["ram", "ram-overflow-disk", "server-disk", "server-disk-persistent"]


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def allocated_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", default="256M", help="bytes written per kind")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    args = parser.parse_args()
    size = parse_size(args.write)
    work = tempfile.mkdtemp(prefix="osstream-overlay-")
    data = os.path.join(work, "data")
    os.makedirs(os.path.join(data, "images"))
    random_image(os.path.join(data, "images", "base.img"), 2 * size)
    payload = os.path.join(work, "payload.raw")
    random_image(payload, size)
    port = free_port()
    config = os.path.join(work, "osstream.toml")

    def configure(ram_capacity):
        with open(config, "w") as f:
            f.write(f'data_dir = "{data}"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                    f'[cache.ram]\nenabled = false\n[sessions]\nram_capacity = "{ram_capacity}"\n'
                    f'[nbd]\nlisten = ["127.0.0.1:{port}"]\n')

    configure(size)

    def cli(*words):
        return subprocess.run([args.binary, "--config", config, *words], check=True, capture_output=True, text=True).stdout.strip()

    cli("init")
    cli("vdisk", "add", "base", "--backend", "images")
    print(f"Writing {args.write} of random data through one session per kind; RAM capacity "
          f"{size >> 20} MiB for ram, {size >> 22} MiB for ram-overflow-disk (so 3/4 spill):\n")
    print("| overlay kind | server RAM per written GiB | server disk per written GiB |")
    print("|---|---|---|")
    for i, kind in enumerate(KINDS):
        mac = f"aa:bb:cc:00:00:{i:02x}"
        configure(size // 4 if kind == "ram-overflow-disk" else size)
        cli("vdisk", "set", "base", "--write-cache", kind)
        cli("client", "add", mac)
        cli("client", "assign", mac, "base")
        server = subprocess.Popen([args.binary, "--config", config, "serve"])
        try:
            wait_port(port)
            uri = cli("session", "open", mac, "base")
            time.sleep(0.5)
            before = rss_bytes(server.pid)
            # A kind whose RAM fills before the payload is written fails with ENOSPC.
            copy = subprocess.run(["nbdcopy", "--flush", payload, uri], capture_output=True, text=True)
            written = size if copy.returncode == 0 else None
            after = rss_bytes(server.pid)
            disk = allocated_bytes(os.path.join(data, "overlays"))
            gib = size / (1 << 30)
            ram_cell = f"{(after - before) / gib / (1 << 20):,.0f} MiB"
            disk_cell = f"{disk / gib / (1 << 20):,.0f} MiB"
            if written is None:
                ram_cell += " (ENOSPC after the RAM capacity, as configured)"
            print(f"| {kind} | {ram_cell} | {disk_cell} |")
        finally:
            stop([server])
        subprocess.run(["rm", "-rf", os.path.join(data, "overlays")], check=True)
    subprocess.run(["rm", "-rf", work], check=True)


if __name__ == "__main__":
    sys.exit(main())
