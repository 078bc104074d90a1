#!/usr/bin/python3
"""Network boot: osstream against stand-ins, one run, alternating (A B, B A, ...).

The stand-ins are what a lab would otherwise run: dnsmasq (DHCP and TFTP), nbdkit's file
plugin (NBD), and Python's static HTTP server for iPXE scripts, kernels and initrds.
Everything runs in network namespaces on a private boot LAN (tests/python/netlab.py);
the clients are qemu (TCG) with its iPXE ROM, curl, and a small DHCP client below.

1. Boot time, qemu start to the guest's marker line, for the test guest (kernel +
   busybox initramfs + NBD root; menu timeout 0) and for the Debian 12 system (its own
   initramfs, to multi-user.target).
2. TFTP: 50 clients (curl, blksize 1428) fetch the same 1 MiB file at once; wall time.
3. DHCP: 1,000 simulated clients complete DISCOVER/OFFER/REQUEST/ACK, 32 in flight;
   completions per second; a NAK sends the client back to DISCOVER. (dnsmasq runs with
   --no-ping: osstream does not probe an address before offering it either.)

Run as root on a quiet machine, after `cargo build --release -p osstream`:
    /usr/bin/python3 benches/scripts/netboot_vs_stand_ins.py [--runs 3] [--skip-debian]
Prints Markdown tables of medians (min-max) and the osstream/stand-in ratio (for times,
below 1.00x means osstream is faster).
"""

import argparse
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

from netboot import DEBIAN_MARKER, MARKER, Machine, build_artifacts, build_debian, machine_id  # noqa: E402
from netlab import Lab  # noqa: E402

BINARY = os.environ.get("OSSTREAM_BIN", os.path.join(ROOT, "target", "release", "osstream"))
LAN = "10.77.0"
SRV = f"{LAN}.1"
BOOT1_MAC = "52:54:00:00:b0:01"
BOOT7_MAC = "52:54:00:00:b0:07"


def wait_for(path, text, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and text in open(path, errors="replace").read():
            return
        time.sleep(0.05)
    raise RuntimeError(f"no {text!r} in {path}:\n{open(path, errors='replace').read()[-2000:]}")


class Osstream:
    """osstream serving DHCP (full mode), TFTP, HTTP and NBD on the LAN."""

    name = "osstream"

    def __init__(self, lab, srv, work, art, deb, dhcp_range=(f"{LAN}.100", f"{LAN}.200"), netmask="255.255.255.0"):
        self.dir = os.path.join(work, "osstream")
        images = os.path.join(self.dir, "data", "images")
        os.makedirs(os.path.join(images, "boot"), exist_ok=True)
        for name in ("vmlinuz", "initrd.img"):
            shutil.copy(os.path.join(art, name), os.path.join(images, "boot", name))
        shutil.copy(os.path.join(art, "root.img"), os.path.join(images, "netroot.img"))
        shutil.copy(os.path.join(art, "san.img"), os.path.join(images, "san.img"))
        if deb:
            subprocess.run(["cp", "--sparse=always", os.path.join(deb, "debian.img"), images], check=True)
            for name in ("vmlinuz-debian", "initrd-debian.img"):
                shutil.copy(os.path.join(deb, name), os.path.join(images, "boot", name))
        self.config = os.path.join(self.dir, "osstream.toml")
        first, last = dhcp_range
        with open(self.config, "w") as f:
            f.write(f'data_dir = "{self.dir}/data"\n[demo]\ncreate = false\n'
                    f'[http]\nenabled = true\nlisten = "{SRV}:8080"\nmenu_timeout = "0s"\n'
                    f'[nbd]\nlisten = ["{SRV}:10809"]\n'
                    f'[tftp]\nenabled = true\nlisten = "{SRV}:69"\nroot = "{work}/tftp"\n'
                    f'[pxe]\nenabled = true\nmode = "dhcp"\ninterface = "eth0"\nserver_ip = "{SRV}"\n'
                    f'[pxe.dhcp]\nrange_start = "{first}"\nrange_end = "{last}"\nnetmask = "{netmask}"\n')
        self.lab, self.srv, self.deb = lab, srv, deb
        self.proc = None

    def cli(self, *args):
        subprocess.run([BINARY, "--config", self.config, *args], check=True, capture_output=True)

    def start(self):
        log = os.path.join(self.dir, f"server-{time.time():.0f}.log")
        self.proc = self.lab.spawn(self.srv, [BINARY, "--config", self.config, "serve"], log)
        wait_for(log, "osstream ready")
        return self

    def setup_clients(self):
        lin = ["--backend", "images", "--boot", "linux-nbd", "--cmdline", "console=ttyS0"]
        self.cli("vdisk", "add", "netroot", *lin, "--kernel", "vmlinuz", "--initrd", "initrd.img")
        self.cli("vdisk", "add", "rescue", "--backend", "images", "--key", "san", "--boot", "sanboot")
        self.cli("client", "add", BOOT1_MAC, "--hostname", "bench-pc-1")
        self.cli("client", "assign", BOOT1_MAC, "netroot", "--default")
        self.cli("client", "assign", BOOT1_MAC, "rescue")
        if self.deb:
            self.cli("vdisk", "add", "debian", *lin, "--kernel", "vmlinuz-debian", "--initrd", "initrd-debian.img")
            self.cli("client", "add", BOOT7_MAC, "--hostname", "bench-pc-7")
            self.cli("client", "assign", BOOT7_MAC, "debian")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


class StandIns:
    """dnsmasq (DHCP + TFTP), nbdkit file (NBD), python3 -m http.server (files)."""

    name = "stand-ins"

    def __init__(self, lab, srv, work, art, deb, dhcp_range=(f"{LAN}.100", f"{LAN}.200"), netmask="255.255.255.0"):
        self.dir = os.path.join(work, "standins")
        self.files = os.path.join(self.dir, "http")
        self.exports = os.path.join(self.dir, "exports")
        os.makedirs(self.files, exist_ok=True)
        os.makedirs(self.exports, exist_ok=True)
        self.art, self.deb, self.lab, self.srv, self.work = art, deb, lab, srv, work
        self.dhcp_range, self.netmask = dhcp_range, netmask
        for name in ("vmlinuz", "initrd.img"):
            shutil.copy(os.path.join(art, name), os.path.join(self.files, name))
        if deb:
            for name in ("vmlinuz-debian", "initrd-debian.img"):
                shutil.copy(os.path.join(deb, name), os.path.join(self.files, name))
        base = f"http://{SRV}:8080"
        with open(os.path.join(self.files, "boot.ipxe"), "w") as f:
            f.write(f"#!ipxe\nchain {base}/${{mac:hexhyp}}.ipxe\n")
        with open(os.path.join(self.files, BOOT1_MAC.replace(":", "-") + ".ipxe"), "w") as f:
            f.write(f"#!ipxe\nkernel --name kernel {base}/vmlinuz initrd=initrd console=ttyS0 root=/dev/nbd0 "
                    f"nbdroot={SRV}:10809/netroot ip=::::bench-pc-1::dhcp systemd.hostname=bench-pc-1\n"
                    f"initrd --name initrd {base}/initrd.img\nboot\n")
        with open(os.path.join(self.files, BOOT7_MAC.replace(":", "-") + ".ipxe"), "w") as f:
            f.write(f"#!ipxe\nkernel --name kernel {base}/vmlinuz-debian initrd=initrd console=ttyS0 "
                    f"root=/dev/nbd0 nbdroot={SRV}:10809/debian ip=::::bench-pc-7::dhcp "
                    f"systemd.hostname=bench-pc-7 systemd.machine_id={machine_id(BOOT7_MAC)}\n"
                    f"initrd --name initrd {base}/initrd-debian.img\nboot\n")
        self.procs = []

    def start(self):
        # Fresh writable copies each time: nbdkit writes into the image it serves.
        shutil.copy(os.path.join(self.art, "root.img"), os.path.join(self.exports, "netroot"))
        if self.deb:
            subprocess.run(["cp", "--sparse=always", os.path.join(self.deb, "debian.img"),
                            os.path.join(self.exports, "debian")], check=True)
        stamp = f"{time.time():.0f}"
        first, last = self.dhcp_range
        self.procs = [
            self.lab.spawn(self.srv, ["dnsmasq", "--no-daemon", "--port=0", "--interface=eth0", "--bind-interfaces",
                                      f"--dhcp-range={first},{last},{self.netmask},1h", "--dhcp-authoritative",
                                      "--no-ping", f"--dhcp-leasefile={self.dir}/leases-{stamp}",
                                      "--dhcp-userclass=set:ipxe,iPXE",
                                      f"--dhcp-boot=tag:ipxe,http://{SRV}:8080/boot.ipxe",
                                      "--dhcp-boot=tag:!ipxe,undionly.kpxe",
                                      "--dhcp-option=tag:ipxe,encap:175,176,1b",
                                      "--enable-tftp", f"--tftp-root={self.work}/tftp",
                                      "--pid-file=", "--conf-file=/dev/null", "--log-facility=-"],
                           os.path.join(self.dir, f"dnsmasq-{stamp}.log")),
            self.lab.spawn(self.srv, ["nbdkit", "-f", "-i", SRV, "-p", "10809", "file", f"dir={self.exports}"],
                           os.path.join(self.dir, f"nbdkit-{stamp}.log")),
            self.lab.spawn(self.srv, ["python3", "-m", "http.server", "8080", "--bind", SRV,
                                      "--directory", self.files], os.path.join(self.dir, f"http-{stamp}.log")),
        ]
        time.sleep(1.0)
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError("a stand-in did not start (see its log in " + self.dir + ")")
        return self

    def setup_clients(self):
        pass

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    # nbdkit waits for the connection of a guest that was killed.
                    proc.kill()
                    proc.wait(timeout=10)


def boot_seconds(lab, work, mac, marker, memory, timeout):
    """qemu start to the first console line holding `marker`."""
    tmp = tempfile.mkdtemp(dir=work)
    import pathlib
    machine = Machine(pathlib.Path(tmp), mac, tap=lab.tap(), netns=lab.lan, memory=memory)
    start = time.perf_counter()
    machine.start()
    try:
        while time.perf_counter() - start < timeout:
            if marker in machine.output():
                return time.perf_counter() - start
            if machine.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"{mac}: no {marker!r}:\n{machine.output()[-3000:]}")
    finally:
        machine.kill()


# --- DHCP load: a small client speaking just enough DHCP ---

def dhcp_packet(kind, xid, mac, requested=None, server=None):
    chaddr = mac + b"\0" * 10
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4,
                       b"\0" * 4, b"\0" * 4, chaddr, b"", b"")
    opts = bytes([99, 130, 83, 99, 53, 1, kind])
    if requested:
        opts += bytes([50, 4]) + requested
    if server:
        opts += bytes([54, 4]) + server
    return head + opts + b"\xff"


def dhcp_reply(data):
    if len(data) < 240:
        return None
    xid = struct.unpack("!I", data[4:8])[0]
    yiaddr = data[16:20]
    kind, server, i = None, None, 240
    while i + 1 < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        code, length = data[i], data[i + 1]
        value = data[i + 2:i + 2 + length]
        if code == 53:
            kind = value[0]
        elif code == 54:
            server = value
        i += 2 + length
    return xid, kind, yiaddr, server


DHCP_CLIENT = r'''
import random, select, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
from netboot_vs_stand_ins import dhcp_packet, dhcp_reply
count, window = int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("0.0.0.0", 68))
base = random.randrange(1 << 20)
state = {}  # xid -> (phase, mac, sent_at)
next_client, done, retries = 0, 0, 0
start = time.perf_counter()
def send(xid, phase, mac, requested=None, server=None):
    kind = 1 if phase == "discover" else 3
    s.sendto(dhcp_packet(kind, xid, mac, requested, server), ("255.255.255.255", 67))
    state[xid] = (phase, mac, time.perf_counter(), requested, server)
while done < count:
    while next_client < count and len(state) < window:
        xid = base + next_client
        mac = bytes([2, 0]) + struct.pack("!I", xid)
        send(xid, "discover", mac)
        next_client += 1
    ready, _, _ = select.select([s], [], [], 0.2)
    if ready:
        data = s.recv(4096)
        reply = dhcp_reply(data)
        if reply and reply[0] in state:
            xid, kind, yiaddr, server = reply
            phase, mac, _, _, _ = state[xid]
            if kind == 2 and phase == "discover":
                send(xid, "request", mac, yiaddr, server)
            elif kind == 5 and phase == "request":
                del state[xid]
                done += 1
            elif kind == 6:
                # NAK: start over, as a DHCP client does.
                retries += 1
                send(xid, "discover", mac)
    now = time.perf_counter()
    for xid, (phase, mac, sent, req, srv) in list(state.items()):
        if now - sent > 2.0:
            retries += 1
            send(xid, phase, mac, req, srv)
print(f"{count / (time.perf_counter() - start):.1f} {retries}")
'''


def dhcp_rate(lab, cli_ns, count, window=32):
    script = os.path.join(tempfile.gettempdir(), "osstream-dhcp-load.py")
    with open(script, "w") as f:
        f.write(DHCP_CLIENT)
    out = subprocess.run(["ip", "netns", "exec", cli_ns, sys.executable, script, HERE, str(count), str(window)],
                         check=True, capture_output=True, text=True, timeout=600).stdout.split()
    return float(out[0])


def tftp_seconds(lab, cli_ns, clients=50):
    procs = []
    start = time.perf_counter()
    for _ in range(clients):
        procs.append(subprocess.Popen(["ip", "netns", "exec", cli_ns, "curl", "-s", "--fail", "--tftp-blksize",
                                       "1428", "-o", "/dev/null", f"tftp://{SRV}/bench.bin"]))
    failed = sum(p.wait() != 0 for p in procs)
    if failed:
        raise RuntimeError(f"{failed} TFTP clients failed")
    return time.perf_counter() - start


def row(results, name, unit, lower_is_better):
    a, b = results["osstream"], results["stand-ins"]
    ma, mb = statistics.median(a), statistics.median(b)
    fmt = "{:,.1f}" if unit == "s" else "{:,.0f}"
    cell = lambda m, v: f"{fmt.format(m)} {unit} ({fmt.format(min(v))}-{fmt.format(max(v))})"
    return f"| {name} | {cell(ma, a)} | {cell(mb, b)} | {ma / mb:.2f}x |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-debian", action="store_true")
    parser.add_argument("--dhcp-clients", type=int, default=1000)
    args = parser.parse_args()
    if not os.path.exists(BINARY):
        sys.exit(f"{BINARY} is missing: cargo build --release -p osstream")
    art = build_artifacts()
    deb = None if args.skip_debian else build_debian()
    work = tempfile.mkdtemp(prefix="osstream-netboot-bench-")
    os.makedirs(os.path.join(work, "tftp"))
    with open(os.path.join(work, "tftp", "bench.bin"), "wb") as f:
        f.write(random.randbytes(1 << 20))
    results = {}
    lab = Lab(LAN)
    try:
        srv = lab.host("srv", 1)
        cli = lab.host("cli", 3)
        lab.router_adverts(srv, os.path.join(work, "ra.log"))
        systems = [Osstream(lab, srv, work, art, deb), StandIns(lab, srv, work, art, deb)]
        systems[0].start().setup_clients()
        systems[0].stop()
        boots = [("boot 1: menu (timeout 0), kernel + initrd over HTTP, NBD root", BOOT1_MAC,
                  f"netboot: marker={MARKER}", 256, 180)]
        if deb:
            boots.append(("boot 7: Debian 12 to multi-user.target, its own initramfs", BOOT7_MAC,
                          f"debian: marker={DEBIAN_MARKER}", 768, 400))
        for run in range(args.runs):
            order = systems if run % 2 == 0 else list(reversed(systems))
            for system in order:
                system.start()
                try:
                    for name, mac, marker, memory, timeout in boots:
                        seconds = boot_seconds(lab, work, mac, marker, memory, timeout)
                        results.setdefault(name, {}).setdefault(system.name, []).append(seconds)
                        print(f"{system.name}: {name}: {seconds:.1f} s", file=sys.stderr)
                    seconds = tftp_seconds(lab, cli)
                    results.setdefault("TFTP: 50 clients x 1 MiB at once", {}).setdefault(system.name, []).append(seconds)
                    print(f"{system.name}: TFTP: {seconds:.2f} s", file=sys.stderr)
                finally:
                    system.stop()
            print(f"boot/TFTP run {run + 1}/{args.runs} done", file=sys.stderr)
        # DHCP load on a bigger pool of its own, each system started fresh.
        pool = (f"{LAN[:-2]}.1.0", f"{LAN[:-2]}.8.255")
        for run in range(args.runs):
            for sub in (f"dhcp-a{run}", f"dhcp-b{run}"):
                os.makedirs(os.path.join(work, sub, "tftp"))
        for run in range(args.runs):
            # Fresh servers each run: leases of the last run's 1,000 clients would fill
            # the pool (dnsmasq gets a new lease file each start too).
            loaders = [Osstream(lab, srv, os.path.join(work, f"dhcp-a{run}"), art, None, pool, "255.255.0.0"),
                       StandIns(lab, srv, os.path.join(work, f"dhcp-b{run}"), art, None, pool, "255.255.0.0")]
            order = loaders if run % 2 == 0 else list(reversed(loaders))
            for system in order:
                system.start()
                try:
                    rate = dhcp_rate(lab, cli, args.dhcp_clients)
                    print(f"{system.name}: DHCP: {rate:.0f} clients/s", file=sys.stderr)
                    results.setdefault(f"DHCP: {args.dhcp_clients} clients, DORA, 32 in flight", {}) \
                        .setdefault(system.name, []).append(rate)
                finally:
                    system.stop()
            print(f"DHCP run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        lab.close()
    print(f"\n{args.runs} alternating runs, medians (min-max); ratio = osstream / stand-ins\n")
    print("| test | osstream | stand-ins (dnsmasq, nbdkit, http.server) | ratio |")
    print("|---|---|---|---|")
    for name, values in results.items():
        unit = "clients/s" if name.startswith("DHCP") else "s"
        print(row(values, name, unit, unit == "s"))


if __name__ == "__main__":
    main()
