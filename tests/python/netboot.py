"""Shared parts of the tests that boot real machines: the guest artifacts, a server set up
for network boot, and qemu (TCG) with its iPXE ROM as the client."""

import os
import shutil
import signal
import subprocess
import time

from conftest import ROOT, TARGET, Server, free_port

CACHE = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
ARTIFACTS = os.environ.get("TEST_NETBOOT_ARTIFACTS", os.path.join(CACHE, "osstream-test", "netboot"))
MARKER = "osstream-netboot-marker-7d3f"
SAN_MARKER = "sanboot: marker osstream-san-5c1e"


DEBIAN = os.environ.get("TEST_NETBOOT_DEBIAN", os.path.join(CACHE, "osstream-test", "netboot-debian"))
DEBIAN_MARKER = "osstream-debian-marker-91c2"


def build_debian():
    """Builds (once, then cached) a Debian 12 vdisk with the initramfs Debian made for it."""
    subprocess.run(["bash", os.path.join(ROOT, "tests", "netboot", "build-debian.sh"), DEBIAN],
                   check=True, timeout=1800)
    return DEBIAN


def machine_id(mac):
    """The machine-id osstream gives the client with this MAC."""
    import hashlib
    return hashlib.sha256(f"osstream machine-id\0{mac}".encode()).hexdigest()[:32]


def static_agent():
    """The statically linked osstream-agent (what goes into an initramfs), as
    scripts/build-agent.sh builds it (scripts/test.sh runs it first)."""
    path = os.environ.get("TEST_AGENT_STATIC",
                          os.path.join(TARGET, "x86_64-unknown-linux-gnu", "agent", "osstream-agent"))
    assert os.path.exists(path), f"{path} is missing: build it with scripts/build-agent.sh"
    return path


def agent_initrd(artifacts, out, files=None):
    """The test initramfs with osstream-agent (and `files`: {path in the initramfs: source})
    appended as a second cpio archive (the kernel unpacks both; init.sh uses the agent
    when it finds it)."""
    work = out.parent / "agent-cpio"
    (work / "bin").mkdir(parents=True)
    shutil.copy(static_agent(), work / "bin" / "osstream-agent")
    for inside, source in (files or {}).items():
        (work / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, work / inside)
    archive = subprocess.run("find . | cpio -o -H newc --quiet | gzip -1", shell=True, cwd=work,
                             capture_output=True, check=True).stdout
    with open(os.path.join(artifacts, "initrd.img"), "rb") as f:
        out.write_bytes(f.read() + archive)
    shutil.rmtree(work)


def debian_agent_initrd(debian, out):
    """Debian's own initramfs with osstream-agent and a two-line hook appended as a second
    cpio archive: initramfs-tools' nbd script runs $NBDCLIENT, which the hook points at a
    wrapper that starts the agent and attaches /dev/nbd0 to its socket
    (tests/netboot/agent-hook)."""
    hook = os.path.join(ROOT, "tests", "netboot", "agent-hook")
    work = out.parent / "debian-agent-cpio"
    # usr/sbin: Debian's initramfs has /sbin -> usr/sbin, which a folder named sbin in
    # the second archive would replace.
    sbin = work / "usr" / "sbin"
    sbin.mkdir(parents=True)
    (work / "conf" / "conf.d").mkdir(parents=True)
    shutil.copy(static_agent(), sbin / "osstream-agent")
    shutil.copy(os.path.join(hook, "osstream-nbd-client"), sbin / "osstream-nbd-client")
    os.chmod(sbin / "osstream-nbd-client", 0o755)
    shutil.copy(os.path.join(hook, "osstream-agent.conf"), work / "conf" / "conf.d" / "osstream-agent")
    archive = subprocess.run("find . | cpio -o -H newc --quiet | gzip -1", shell=True, cwd=work,
                             capture_output=True, check=True).stdout
    with open(os.path.join(debian, "initrd-debian.img"), "rb") as f:
        out.write_bytes(f.read() + archive)
    shutil.rmtree(work)


def cache_disk(path, size="1200M"):
    """An empty ext4 file system as a machine's local disk (the agent's cache)."""
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True)
    return path


def agent_stats_on(disk):
    """The agent's last stats file on a powered-off machine's cache disk (the journal
    replayed first, as a mount would)."""
    subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(disk)], capture_output=True)
    out = subprocess.run(["debugfs", "-R", "cat /osstream/agent-stats.json", str(disk)], capture_output=True,
                         text=True, check=True).stdout
    import json
    return json.loads(out)


def build_artifacts():
    """Builds (once, then cached) the kernel, initramfs and disks the guests boot."""
    subprocess.run(["bash", os.path.join(ROOT, "tests", "netboot", "build-artifacts.sh"), ARTIFACTS],
                   check=True, timeout=900)
    return ARTIFACTS


def netboot_server(tmp_path, artifacts, http_extra="", extra=""):
    """A server whose HTTP and NBD listeners are on loopback, published at the addresses a
    guest on qemu's user network reaches loopback by (10.0.2.2). Its file backend holds
    `netroot` (the ext4 root), `san` (the HTTP SAN disk) and the kernel and initrd under
    `boot/`."""
    http = free_port()
    server = Server(tmp_path, config_extra=(
        f'[http]\nenabled = true\nlisten = "127.0.0.1:{http}"\n'
        f'public_url = "http://10.0.2.2:{http}"\nmenu_timeout = "1s"\n{http_extra}\n'
        '[nbd]\nlisten = ["127.0.0.1:PORT"]\npublic_address = "10.0.2.2:PORT"\n'
        f"{extra}\n"), demo=False)
    server.http_port = http
    server.http = f"http://127.0.0.1:{http}"
    boot = server.images / "boot"
    boot.mkdir()
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(os.path.join(artifacts, name), boot / name)
    shutil.copy(os.path.join(artifacts, "root.img"), server.images / "netroot.img")
    shutil.copy(os.path.join(artifacts, "san.img"), server.images / "san.img")
    return server


def add_linux_vdisk(server, name, key="netroot", description=""):
    server.cli("vdisk", "add", name, "--backend", "images", "--key", key, "--boot", "linux-nbd",
               "--kernel", "vmlinuz", "--initrd", "initrd.img", "--cmdline", "console=ttyS0",
               "--description", description)


class Machine:
    """A diskless PC: qemu with a virtio NIC whose iPXE ROM boots from the network.

    On qemu's user network the boot file URL comes from qemu's own DHCP; the serial
    console (SeaBIOS, iPXE, the kernel, the initramfs) goes to a log file."""

    def __init__(self, tmp_path, mac, bootfile=None, memory=256, tap=None, netns=None, uefi=False, disk=None):
        """On qemu's user network (`bootfile` from qemu's own DHCP), or on `tap` in the
        network namespace `netns` (DHCP from the LAN: osstream's, or another server's)."""
        self.mac = mac
        self.log = tmp_path / f"qemu-{mac.replace(':', '')}.log"
        if tap:
            netdev = f"tap,id=n0,ifname={tap},script=no,downscript=no"
        else:
            netdev = f"user,id=n0,bootfile={bootfile}"
        nic = f"virtio-net-pci,netdev=n0,mac={mac}"
        firmware = []
        if uefi:
            # OVMF's own PXE client: the NIC's iPXE option ROM is turned off.
            nic += ",romfile="
            variables = tmp_path / f"OVMF_VARS-{mac.replace(':', '')}.fd"
            shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", variables)
            firmware = ["-drive", "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                        "-drive", f"if=pflash,format=raw,file={variables}"]
        self.args = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory), "-nographic", "-no-reboot",
                     *firmware, "-netdev", netdev, "-device", nic, "-boot", "n"]
        if disk:
            # A local disk (the agent's cache): a virtio disk the firmware does not boot.
            self.args += ["-drive", f"file={disk},if=virtio,format=raw"]
        if netns:
            self.args = ["ip", "netns", "exec", netns, *self.args]
        self.proc = None

    def start(self):
        self.log_file = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        return self

    def output(self):
        return self.log.read_bytes().decode("latin-1")

    def unwrapped(self):
        """The output with line breaks removed: iPXE wraps long lines at 80 columns."""
        return self.output().replace("\r", "").replace("\n", "")

    def wait_exit(self, timeout=150):
        """Waits for the guest to power off; returns its console output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.mac} did not power off within {timeout}s:\n{self.output()[-3000:]}")
        self.log_file.close()
        return self.output()

    def wait_for(self, text, timeout=90):
        """Waits until the console shows `text` (the guest keeps running); returns the output."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.output()
            if text in out or text in self.unwrapped():
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"{self.mac}: no {text!r} on the console:\n{self.output()[-3000:]}")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        if not self.log_file.closed:
            self.log_file.close()


def console_lines(output, prefix="netboot: "):
    """The lines the test initramfs printed, without the prefix."""
    return [line.split(prefix, 1)[1].strip() for line in output.splitlines() if prefix in line]
