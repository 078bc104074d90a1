"""`[limits]`: per-client and per-group bandwidth and IOPS token buckets, with real
clients. A limit is a floor on how long a transfer takes (it can never go faster), so the
checks are lower bounds, with the burst taken into account."""

import subprocess
import time

import nbd

from conftest import random_image, sha256

MIB = 1 << 20


def build(make_server, limits):
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    f'[limits]\n{limits}\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    random_image(s.images / "deb.img", 24 * MIB, seed=31)
    s.start()
    s.cli("vdisk", "add", "deb", "--backend", "images")
    for mac, group in (("aa:bb:cc:00:00:01", None), ("aa:bb:cc:00:00:02", "lab"), ("aa:bb:cc:00:00:03", "fast")):
        s.cli("client", "add", mac, *(["--group", group] if group else []))
        s.cli("client", "assign", mac, "deb")
    return s


def timed_copy(s, mac, tmp_path):
    uri = s.cli("session", "open", mac, "deb")
    out = tmp_path / f"{mac.replace(':', '')}.img"
    started = time.monotonic()
    subprocess.run(["nbdcopy", "--connections=4", uri, str(out)], check=True, timeout=300)
    took = time.monotonic() - started
    assert sha256(out) == sha256(s.images / "deb.img")
    return took


def test_bandwidth_per_client_and_per_group(make_server, tmp_path):
    s = build(make_server, 'bandwidth = "8MiB"\n[limits.groups.lab]\nbandwidth = "16MiB"\n'
                           '[limits.groups.fast]\n')
    # 24 MiB at 8 MiB/s with 1 s (8 MiB) of burst: at least 2 s, however many connections.
    assert timed_copy(s, "aa:bb:cc:00:00:01", tmp_path) >= 1.9
    # The lab group's clients get 16 MiB/s each: at least 0.5 s.
    lab = timed_copy(s, "aa:bb:cc:00:00:02", tmp_path)
    assert lab >= 0.45
    # Connections one after another share the bucket too (no fresh burst with each):
    # three more copies of 24 MiB, one burst (8 MiB) then 8 MiB/s: at least 8 s (6 s if
    # each copy's connections got a fresh burst).
    started = time.monotonic()
    for _ in range(3):
        timed_copy(s, "aa:bb:cc:00:00:01", tmp_path)
    assert time.monotonic() - started >= 7.5
    # A group with no rates of its own is not limited at all.
    fast = timed_copy(s, "aa:bb:cc:00:00:03", tmp_path)
    assert fast < lab, (fast, lab)
    assert s.alive()


def test_iops_shared_by_a_clients_connections_and_by_a_group(make_server, tmp_path):
    s = build(make_server, 'iops = 100\n[limits.groups.lab]\niops = 1000\ntotal = { iops = 40 }\n')
    uri = s.cli("session", "open", "aa:bb:cc:00:00:01", "deb")
    handles = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    started = time.monotonic()
    # 300 reads over two connections of one client: 100 of burst, then 100/s: >= 2 s.
    for i in range(150):
        for h in handles:
            h.pread(512, i * 4096)
    assert time.monotonic() - started >= 1.9
    for h in handles:
        h.shutdown()
    # The lab group shares 40/s over all its clients, below its 1000/s per client.
    uri = s.cli("session", "open", "aa:bb:cc:00:00:02", "deb")
    h = nbd.NBD()
    h.connect_uri(uri)
    started = time.monotonic()
    for i in range(80):
        h.pread(512, i * 4096)
    assert time.monotonic() - started >= 0.9
    h.shutdown()


def test_bad_limits_are_named(make_server):
    s = make_server('[limits]\niops = 0\n', start=False)
    s.start(wait=False)
    assert s.proc.wait(timeout=60) != 0
    assert "[limits] iops = 0 would stop every client" in s.log.read_text(), s.log.read_text()
