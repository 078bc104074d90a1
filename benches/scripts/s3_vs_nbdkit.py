#!/usr/bin/env python3
"""osstream's S3 backend against nbdkit's S3 plugin: same S3 server, same object, same
clients, one run, alternating.

Starts s3rver (npm) on loopback, uploads one image of random bytes (default 1 GiB) with
`osstream vdisk import`, then serves that object with osstream (kind = "s3") and with
`nbdkit S3` (python plugin + boto3), and runs each client A B A B...:

- cold: osstream's RAM cache off, so every read goes to S3, as every nbdkit read does;
- warm: osstream's RAM cache on and filled by one pass first (nbdkit has no cache, so its
  column is the cold figure again, measured in the same run).

    cargo build --release
    python3 benches/scripts/s3_vs_nbdkit.py [--size 1G] [--runs 3] [--runtime 10]

Needs: s3rver (`npm install s3rver@3`; pass --s3rver or set TEST_S3RVER), nbdkit,
nbdkit-plugin-python, python3-boto3, libnbd-bin (nbdcopy), fio.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from benchlib import ROOT, alternate, fio_read, free_port, nbdcopy_seconds, parse_size, random_image, \
    stop, table, wait_port

BUCKET = "vdisks"


def rows(size, runtime):
    mib = size / (1 << 20)
    return [
        ("nbdcopy whole image (4 conns)", "MiB/s", lambda u: mib / nbdcopy_seconds(u)),
        ("fio rand 4k, QD1", "IOPS", lambda u: fio_read(u, "randread", "4k", 1, runtime)["iops"]),
        ("fio rand 4k, QD8", "IOPS", lambda u: fio_read(u, "randread", "4k", 8, runtime)["iops"]),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/osstream"))
    parser.add_argument("--s3rver", default=os.environ.get("TEST_S3RVER") or shutil.which("s3rver") or
                        os.path.expanduser("~/.cache/osstream-test/node_modules/.bin/s3rver"))
    args = parser.parse_args()
    for tool in ("nbdkit", "nbdcopy", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing (apt-get install nbdkit nbdkit-plugin-python python3-boto3 libnbd-bin fio)")
    for path, hint in ((args.binary, "run cargo build --release first"), (args.s3rver, "npm install s3rver@3")):
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: {hint}")

    work = tempfile.mkdtemp(prefix="osstream-s3-bench-")
    os.makedirs(os.path.join(work, "s3"))
    image = os.path.join(work, "bench.img")
    size = parse_size(args.size)
    random_image(image, size)
    s3_port, cold_port, warm_port, kit_port = free_port(), free_port(), free_port(), free_port()
    s3rver = subprocess.Popen([args.s3rver, "-d", os.path.join(work, "s3"), "-a", "127.0.0.1", "-p", str(s3_port),
                               "-s", "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL)
    servers = [s3rver]
    try:
        wait_port(s3_port)
        backend = (f'[backends.s3]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "bench"\n'
                   f'endpoint = "http://127.0.0.1:{s3_port}"\nregion = "us-east-1"\n'
                   f'access_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\nallow_http = true\n')
        configs = {}
        for name, port, cache in (("cold", cold_port, "enabled = false"),
                                  ("warm", warm_port, f'capacity = "{2 * size}"')):
            data = os.path.join(work, name)
            configs[name] = os.path.join(work, f"{name}.toml")
            with open(configs[name], "w") as f:
                f.write(f'data_dir = "{data}"\n[demo]\ncreate = false\n[log]\nfilter = "warn"\n'
                        f'[cache.ram]\n{cache}\n[nbd]\nlisten = ["127.0.0.1:{port}"]\n{backend}')
        subprocess.run([args.binary, "--config", configs["cold"], "vdisk", "import", image, "os", "--backend", "s3",
                        "--quiet"], check=True)
        for name in ("cold", "warm"):
            servers.append(subprocess.Popen([args.binary, "--config", configs[name], "serve"]))
        # The system PATH: nbdkit's embedded Python must be Debian's (with boto3), not one
        # a version manager (pyenv) put first on PATH.
        env = dict(os.environ, AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER",
                   AWS_DEFAULT_REGION="us-east-1", PATH="/usr/sbin:/usr/bin:/sbin:/bin")
        servers.append(subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-r", "-p", str(kit_port), "-i", "127.0.0.1", "S3",
             f"endpoint-url=http://127.0.0.1:{s3_port}", f"bucket={BUCKET}", "key=bench/os"], env=env))
        for port in (cold_port, warm_port, kit_port):
            wait_port(port)
        peers = {"cold": f"nbd://127.0.0.1:{cold_port}/os", "warm": f"nbd://127.0.0.1:{warm_port}/os",
                 "nbdkit": f"nbd://127.0.0.1:{kit_port}/"}
        nbdcopy_seconds(peers["warm"])  # fill the warm server's RAM cache
        table_rows = rows(size, args.runtime)
        results = alternate(peers, table_rows, args.runs)
        print(f"\nImage {args.size} random in s3rver, {args.runs} runs alternating, medians (min-max):\n")
        print("Cold (osstream RAM cache off: every read is a range GET):\n")
        print(table(results, table_rows, "cold", "nbdkit", "osstream s3", "nbdkit S3"))
        print("\nWarm (osstream RAM cache filled first):\n")
        print(table(results, table_rows, "warm", "nbdkit", "osstream s3", "nbdkit S3"))
    finally:
        stop(servers)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
