#!/usr/bin/env python3
"""Writes the synthetic traces of this folder (deterministic: same files every run).

- scan-1gib.trace: one client reading a whole 1 GiB image front to back in 1 MiB reads
  at about 200 MB/s (a backup, `dd`, an antivirus scan): touches every block once, the
  pattern that flushes an LRU cache.
- desktop-zipf.trace: 20,000 random 4 KiB reads of a running desktop over 1 GiB, one
  per millisecond, block popularity Zipf-distributed (s = 1.1 over 16,384 blocks of
  64 KiB): a small hot set read again and again, a long tail read rarely.

    python3 benches/traces/synthetic.py
"""

import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30


def write(name, size, reads, about):
    with open(os.path.join(HERE, name), "w") as f:
        f.write("# osstream boot trace 1\n")
        f.write(f"# vdisk=synthetic size={size} reads={len(reads)}\n# {about}\n")
        for at, offset, length in reads:
            f.write(f"{at} {offset} {length}\n")


def scan():
    mib = 1 << 20
    reads = [(i * 5000, i * mib, mib) for i in range(GIB // mib)]
    write("scan-1gib.trace", GIB, reads, "synthetic: a sequential scan of 1 GiB (benches/traces/synthetic.py)")


def zipf():
    rng = random.Random(11)
    blocks = GIB // (64 << 10)
    weights = [1.0 / (rank ** 1.1) for rank in range(1, blocks + 1)]
    # Popular blocks are spread over the disk, not packed at its start.
    placement = list(range(blocks))
    rng.shuffle(placement)
    chosen = rng.choices(range(blocks), weights=weights, k=20000)
    reads = []
    for n, rank in enumerate(chosen):
        block = placement[rank]
        offset = block * (64 << 10) + rng.randrange(16) * 4096
        reads.append((n * 1000, offset, 4096))
    write("desktop-zipf.trace", GIB, reads, "synthetic: Zipf(1.1) 4 KiB reads over 1 GiB (benches/traces/synthetic.py)")


if __name__ == "__main__":
    scan()
    zipf()
