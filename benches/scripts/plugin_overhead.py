#!/usr/bin/env python3
"""The plugin path against the built-in file backend, in one osstream, one run.

Serves the same random image (page cache) twice from one osstream: through the built-in
`file` backend and through the C example plugin (`plugins/examples/c-rawfile`, which does
the same positional reads behind the C ABI). The RAM cache is off, so every request takes
the backend path; the ratio is plugin/built-in (1.00x = no overhead).

    cargo build --release
    python3 benches/scripts/plugin_overhead.py [--size 1G] [--runs 3] [--runtime 10]
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from benchlib import ROOT, alternate, free_port, parse_size, random_image, standard_rows, stop, \
    table, wait_port


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        sys.exit(f"{args.binary} is missing: run cargo build --release first")
    work = tempfile.mkdtemp(prefix="osstream-plugin-bench-")  # mode 0700: the host accepts it
    images = os.path.join(work, "images")
    os.makedirs(images)
    size = parse_size(args.size)
    random_image(os.path.join(images, "bench.img"), size)
    lib = os.path.join(work, "librawfile.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-I", os.path.join(ROOT, "plugins/abi/include"),
                    "-o", lib, os.path.join(ROOT, "plugins/examples/c-rawfile/rawfile.c")], check=True)
    port = free_port()
    config = os.path.join(work, "osstream.toml")
    with open(config, "w") as f:
        f.write(f'data_dir = "{work}"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                f'[cache.ram]\nenabled = false\n[nbd]\nlisten = ["127.0.0.1:{port}"]\n'
                f'[backends.images]\nkind = "file"\nroot = "images"\n'
                f'[backends.vendor]\nkind = "plugin"\npath = "{lib}"\nconfig = {{ root = "{images}" }}\n')
    server = subprocess.Popen([args.binary, "--config", config, "serve"])
    try:
        wait_port(port)
        peers = {"plugin": f"nbd://127.0.0.1:{port}/vendor/bench", "file": f"nbd://127.0.0.1:{port}/images/bench"}
        rows = standard_rows(size, args.runtime)
        results = alternate(peers, rows, args.runs)
        print(f"\nImage {args.size} random, RAM cache off, {args.runs} runs alternating, medians (min-max):\n")
        print(table(results, rows, "plugin", "file", "C plugin (rawfile)", "built-in file"))
    finally:
        stop([server])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
