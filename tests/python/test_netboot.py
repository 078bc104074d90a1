"""Real machines boot from osstream over the network: qemu (TCG) with its iPXE ROM fetches
/boot.ipxe, gets its own script or menu from the catalog, loads kernel and initrd over
HTTP and mounts its root over NBD from its session (or boots a disk over HTTP SAN).

The guest's initramfs (tests/netboot/init.sh) reads the kernel command line osstream
wrote, prints what it sees with a `netboot:` prefix and powers off. Each boot takes
10-30 s under TCG, so these run one machine at a time except where two must boot at once.
"""

import json
import os
import re
import shutil
import subprocess
import threading
import time

import pytest

from conftest import make_pki, sha256
from netboot import (MARKER, SAN_MARKER, Machine, add_linux_vdisk, agent_initrd, agent_stats_on,
                     build_artifacts, cache_disk, console_lines, debian_agent_initrd, netboot_server)


@pytest.fixture(scope="module")
def artifacts():
    return build_artifacts()


def bootfile(server):
    return f"http://10.0.2.2:{server.http_port}/boot.ipxe"


def test_the_menu_offers_both_vdisks_and_the_default_boots_with_an_nbd_root(tmp_path, artifacts):
    server = netboot_server(tmp_path, artifacts)
    server.start()
    try:
        base = sha256(server.images / "netroot.img")
        add_linux_vdisk(server, "netroot", description="Netboot root")
        server.cli("vdisk", "add", "rescue", "--backend", "images", "--key", "san", "--boot", "sanboot",
                   "--description", "Rescue disk")
        server.cli("client", "add", "52:54:00:00:10:01", "--hostname", "lab-pc-01")
        server.cli("client", "assign", "52:54:00:00:10:01", "rescue")
        server.cli("client", "assign", "52:54:00:00:10:01", "netroot", "--default")

        out = Machine(tmp_path, "52:54:00:00:10:01", bootfile(server)).start().wait_exit()
        # The menu: both vdisks, in assignment order, plus the local disk and a shell.
        assert "Rescue disk" in out and "Netboot root" in out
        assert out.index("Rescue disk") < out.index("Netboot root")
        assert "Boot from the local disk" in out and "iPXE shell" in out
        lines = console_lines(out)
        assert f"marker={MARKER}" in lines, out[-3000:]
        assert "hostname=lab-pc-01 machine_id=" in " ".join(lines)
        assert "sees written-by-lab-pc-01.txt" in lines
        assert lines[-1] == "done"
    finally:
        server.stop()
    log = server.log.read_text()
    assert "boot session opened client=52:54:00:00:10:01 vdisk=netroot" in log
    written = [int(w.split("=")[1]) for w in log.split() if w.startswith("written_bytes=")]
    assert written and max(written) > 0, log
    # The write went to the session's overlay; the vdisk's image is unchanged.
    assert sha256(server.images / "netroot.img") == base


def test_two_clients_of_one_vdisk_boot_at_once_each_with_its_identity_and_writes(tmp_path, artifacts):
    server = netboot_server(tmp_path, artifacts)
    server.start()
    try:
        add_linux_vdisk(server, "netroot")
        macs = ["52:54:00:00:20:01", "52:54:00:00:20:02"]
        for i, mac in enumerate(macs):
            server.cli("client", "add", mac, "--hostname", f"twin-{i + 1}")
            server.cli("client", "assign", mac, "netroot")
        machines = [Machine(tmp_path, mac, bootfile(server)) for mac in macs]
        outputs = {}

        def boot(machine):
            outputs[machine.mac] = machine.start().wait_exit(timeout=240)

        threads = [threading.Thread(target=boot, args=(m,)) for m in machines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    identities = {}
    for i, mac in enumerate(macs):
        lines = console_lines(outputs[mac])
        assert f"marker={MARKER}" in lines, outputs[mac][-3000:]
        ident = next(line for line in lines if line.startswith("hostname="))
        identities[mac] = ident
        assert ident.startswith(f"hostname=twin-{i + 1} ")
        # Each sees its own write, not its twin's.
        seen = [line for line in lines if line.startswith("sees ")]
        assert seen == [f"sees written-by-twin-{i + 1}.txt"], lines
    machine_ids = {ident.split("machine_id=")[1] for ident in identities.values()}
    assert len(machine_ids) == 2


def test_a_disk_boots_over_http_san(tmp_path, artifacts):
    server = netboot_server(tmp_path, artifacts)
    server.start()
    machine = Machine(tmp_path, "52:54:00:00:30:01", bootfile(server))
    try:
        server.cli("vdisk", "add", "san", "--backend", "images", "--boot", "sanboot")
        server.cli("client", "add", "52:54:00:00:30:01")
        server.cli("client", "assign", "52:54:00:00:30:01", "san")
        out = machine.start().wait_for(SAN_MARKER)
        assert "sanboot: boot sector running" in out
        assert "FAILED" not in out
    finally:
        machine.kill()
        server.stop()
    assert "http: SAN attached" in server.log.read_text()


def test_an_unknown_machine_gets_the_policy_message_and_register_adds_it(tmp_path, artifacts):
    server = netboot_server(tmp_path, artifacts)
    server.start()
    mac = "52:54:00:00:40:01"
    try:
        machine = Machine(tmp_path, mac, bootfile(server))
        # The message's last line: the console may not have shown it yet at its first.
        machine.start().wait_for(f"osstream client add {mac}")
        machine.kill()
        assert "is not registered on this server" in machine.unwrapped()
        assert mac not in server.cli("client", "list")

        server.cli("policy", "set", "register")
        machine = Machine(tmp_path, mac, bootfile(server))
        machine.start().wait_for("has no vdisk assigned")
        machine.kill()
        assert mac in server.cli("client", "list")
    finally:
        server.stop()


# --- On a private boot LAN: osstream's own DHCP, or ProxyDHCP beside another server ---

LAN = "10.77.0"
# [pxe] in full DHCP mode with a pool on the LAN.
FULL_DHCP = f'mode = "dhcp"\n[pxe.dhcp]\nrange_start = "{LAN}.100"\nrange_end = "{LAN}.120"\n'


def lan_server(tmp_path, artifacts, lab, pxe):
    """osstream in its own namespace on the boot LAN (10.77.0.1): DHCP as `pxe` says,
    TFTP from Debian's ipxe package, HTTP and NBD on its LAN address."""
    srv = lab.host("srv", 1)
    lab.router_adverts(srv, tmp_path / "ra.log")
    server = netboot_server(tmp_path, artifacts)
    server.config.write_text(
        f'data_dir = "{server.data_dir}"\n[demo]\ncreate = false\n'
        f'[http]\nenabled = true\nlisten = "{LAN}.1:8080"\nmenu_timeout = "1s"\n'
        f'[nbd]\nlisten = ["{LAN}.1:10809"]\n'
        f'[tftp]\nenabled = true\nlisten = "{LAN}.1:69"\n'
        f'[pxe]\nenabled = true\ninterface = "eth0"\nserver_ip = "{LAN}.1"\n{pxe}\n')
    server.wrap = ["ip", "netns", "exec", srv]
    return server


@pytest.fixture
def lab():
    from netlab import Lab
    lab = Lab(LAN)
    yield lab
    lab.close()


def test_full_dhcp_mode_boots_a_machine_from_its_menu_at_its_reserved_address(tmp_path, artifacts, lab):
    server = lan_server(tmp_path, artifacts, lab,
                        FULL_DHCP)
    server.start()
    try:
        add_linux_vdisk(server, "netroot", description="Netboot root")
        server.cli("vdisk", "add", "rescue", "--backend", "images", "--key", "san", "--boot", "sanboot",
                   "--description", "Rescue disk")
        mac = "52:54:00:00:50:01"
        server.cli("client", "add", mac, "--hostname", "lab-pc-50", "--ip", f"{LAN}.42")
        server.cli("client", "assign", mac, "netroot", "--default")
        server.cli("client", "assign", mac, "rescue")
        machine = Machine(tmp_path, mac, tap=lab.tap(), netns=lab.lan)
        out = machine.start().wait_exit(timeout=180)
        assert "Netboot root" in out and "Rescue disk" in out
        lines = console_lines(out)
        assert f"marker={MARKER}" in lines, out[-3000:]
        assert f"address {LAN}.42/24" in lines
        assert "sees written-by-lab-pc-50.txt" in lines
        assert lines[-1] == "done"
        # The write went to the session's overlay, not the image.
        assert sha256(server.images / "netroot.img") == sha256(os.path.join(artifacts, "root.img"))
        sessions = server.cli("session", "list", "--all")
        assert f"{LAN}.42" in sessions
        # The script (and its session) goes only to where DHCP saw the MAC; a MAC this
        # DHCP never saw gets none.
        srv = server.wrap[-1]
        for wanted_mac, why in ((mac, "given only to the address"), ("52:54:00:00:50:99", "has not seen")):
            body = lab.exec(srv, "curl", "-s", f"http://{LAN}.1:8080/ipxe/{wanted_mac}").stdout
            assert why in body and "kernel" not in body, (wanted_mac, body)
    finally:
        server.stop()
    log = server.log.read_text()
    assert f"pxe: ack client={mac} ip={LAN}.42" in log
    assert "boot session opened client=52:54:00:00:50:01 vdisk=netroot" in log


def test_proxy_mode_boots_a_machine_beside_another_dhcp_server(tmp_path, artifacts, lab):
    dhcp = lab.host("dhcp", 2)
    leases = tmp_path / "udhcpd.leases"
    leases.write_text("")
    conf = tmp_path / "udhcpd.conf"
    conf.write_text(f"start {LAN}.50\nend {LAN}.60\ninterface eth0\nlease_file {leases}\n"
                    f"option subnet 255.255.255.0\noption lease 600\n")
    lab.spawn(dhcp, ["busybox", "udhcpd", "-f", str(conf)], tmp_path / "udhcpd.log")
    server = lan_server(tmp_path, artifacts, lab, 'mode = "proxy"\n')
    server.start()
    try:
        add_linux_vdisk(server, "netroot")
        mac = "52:54:00:00:60:01"
        server.cli("client", "add", mac, "--hostname", "proxied-pc")
        server.cli("client", "assign", mac, "netroot")
        out = Machine(tmp_path, mac, tap=lab.tap(), netns=lab.lan).start().wait_exit(timeout=180)
        lines = console_lines(out)
        assert f"marker={MARKER}" in lines, out[-3000:]
        address = next(line for line in lines if line.startswith("address "))
        assert address.startswith(f"address {LAN}.5") or address.startswith(f"address {LAN}.60"), address
        assert lines[-1] == "done"
    finally:
        server.stop()
    log = server.log.read_text()
    assert f"pxe: proxy offer client={mac}" in log
    assert "pxe: ack" not in log  # never an address from osstream in proxy mode


def test_uefi_firmware_gets_ipxe_over_tftp_then_boots_the_same_way(tmp_path, artifacts, lab):
    server = lan_server(tmp_path, artifacts, lab,
                        FULL_DHCP)
    server.start()
    try:
        add_linux_vdisk(server, "netroot")
        mac = "52:54:00:00:70:01"
        server.cli("client", "add", mac, "--hostname", "uefi-pc")
        server.cli("client", "assign", mac, "netroot")
        machine = Machine(tmp_path, mac, tap=lab.tap(), netns=lab.lan, uefi=True, memory=512)
        out = machine.start().wait_exit(timeout=300)
        lines = console_lines(out)
        assert f"marker={MARKER}" in lines, out[-3000:]
        assert lines[-1] == "done"
    finally:
        server.stop()
    log = server.log.read_text()
    # OVMF's PXE client asked as UEFI x64 and got ipxe.efi over TFTP; iPXE then got the script.
    assert "tftp: sent" in log and "file=snponly.efi" in log, log
    assert "boot session opened client=52:54:00:00:70:01" in log


def test_a_debian_system_boots_to_multi_user_with_the_initramfs_debian_made(tmp_path, artifacts, lab):
    from netboot import DEBIAN_MARKER, build_debian, machine_id
    debian = build_debian()
    server = lan_server(tmp_path, artifacts, lab,
                        FULL_DHCP)
    subprocess.run(["cp", "--sparse=always", f"{debian}/debian.img", str(server.images / "debian.img")], check=True)
    for name in ("vmlinuz-debian", "initrd-debian.img"):
        shutil.copy(f"{debian}/{name}", server.images / "boot" / name)
    # A machine that powers off leaves its NBD connection behind (no FIN from a dead
    # guest): its recording ends after a quiet period, short here to keep the test short.
    server.config.write_text(server.config.read_text() + '[profile]\nquiet = "8s"\ntrace_dir = "traces"\n')
    (tmp_path / "again").mkdir()
    server.start()
    try:
        server.cli("vdisk", "add", "debian", "--backend", "images", "--boot", "linux-nbd",
                   "--kernel", "vmlinuz-debian", "--initrd", "initrd-debian.img", "--cmdline", "console=ttyS0",
                   "--description", "Debian 12")
        mac = "52:54:00:00:80:01"
        server.cli("client", "add", mac, "--hostname", "deb-pc-01")
        server.cli("client", "assign", mac, "debian")
        wanted = (f"debian: marker={DEBIAN_MARKER} hostname=deb-pc-01 machine_id={machine_id(mac)} "
                  "target=active")
        out = Machine(tmp_path, mac, tap=lab.tap(), netns=lab.lan, memory=768).start().wait_exit(timeout=400)
        assert wanted in out, out[-4000:]
        # The boot was recorded when the machine powered off (its NBD connection closed).
        wait_logged(server, "boot profile recorded")
        first_cache = stop_counters(server, "cache statistics")
        log = server.log.read_text()
        assert "boot session opened client=52:54:00:00:80:01 vdisk=debian" in log
        profile = json.loads(server.cli("--json", "profile", "show", "debian"))
        assert profile["boots"] == 1 and profile["current"] is True, profile
        assert profile["boot_set_bytes"] > 8 << 20, profile

        # Restarted, so its RAM cache is empty: the second boot's blocks are streamed in
        # from the profile ahead of the machine, and its reads hit.
        server.start()
        out = Machine(tmp_path / "again", mac, tap=lab.tap(), netns=lab.lan, memory=768).start().wait_exit(timeout=400)
        assert wanted in out, out[-4000:]
        wait_logged(server, "boot profile recorded")
    finally:
        server.stop()
    log = server.log.read_text()
    assert "prefetching the boot set" in log and "boot set prefetch done" in log, log[-3000:]
    second_cache = counters(log, "cache statistics")
    # Without the profile, each block the boot read from its disk was a miss (so were the
    # kernel's and initrd's, fetched over HTTP through the same cache); with it, the
    # disk's blocks were prefetched, and the boot's first reads of them are hits.
    gained = second_cache["hits"] - first_cache["hits"]
    assert gained >= 0.9 * profile["boot_set_blocks"], (first_cache, second_cache, profile)
    assert second_cache["backend_bytes"] <= first_cache["backend_bytes"], (first_cache, second_cache)
    assert json.loads(server.cli("--json", "profile", "show", "debian"))["boots"] == 2
    # Each boot left a trace of its reads (the input of `osstream bench cache`).
    traces = sorted((server.data_dir / "traces").glob("debian-*.trace"))
    assert len(traces) == 2, traces
    for trace in traces:
        lines = trace.read_text().splitlines()
        assert lines[0] == "# osstream boot trace 1" and len(lines) > 500, lines[:3]
    if os.environ.get("KEEP_BOOT_TRACES"):
        for n, trace in enumerate(traces):
            shutil.copy(trace, os.path.join(os.environ["KEEP_BOOT_TRACES"], f"debian12-boot{n + 1}.trace"))


def wait_logged(server, text, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in server.log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not logged:\n{server.log.read_text()[-3000:]}")


def test_a_machine_boots_through_the_agent_and_its_second_boot_reads_its_boot_set_locally(tmp_path, artifacts):
    """The initramfs runs osstream-agent with its cache on the machine's own (virtio)
    disk: the first boot, with an empty cache, streams from the server and is recorded as
    the vdisk's profile; the second finds the whole boot set on the local disk."""
    server = netboot_server(tmp_path, artifacts, extra='[profile]\nquiet = "2s"\nmin_bytes = "16KiB"\n')
    agent_initrd(artifacts, server.images / "boot" / "initrd-agent.img")
    server.start()
    mac = "52:54:00:00:10:21"
    try:
        base = sha256(server.images / "netroot.img")
        server.cli("vdisk", "add", "netroot", "--backend", "images", "--key", "netroot", "--boot", "linux-nbd",
                   "--kernel", "vmlinuz", "--initrd", "initrd-agent.img", "--cmdline", "console=ttyS0")
        server.cli("client", "add", mac, "--hostname", "agent-pc")
        server.cli("client", "assign", mac, "netroot")
        cache = cache_disk(tmp_path / "cache.img", "128M")

        def boot():
            out = Machine(tmp_path, mac, bootfile(server), disk=cache).start().wait_exit()
            lines = console_lines(out)
            assert "agent serves /dev/nbd0" in lines, out[-3000:]
            assert f"marker={MARKER}" in lines and "sees written-by-agent-pc.txt" in lines, out[-3000:]
            assert lines[-1] == "done", out[-3000:]
            assert not [l for l in lines if l.startswith("agent-log")], lines
            stats = next(l for l in lines if l.startswith("agent-stats "))
            return json.loads(stats[len("agent-stats "):])

        first = boot()
        assert first["writes"] == "local" and first["boot_set"]["blocks"] == 0, first
        # The initramfs said when its boot was complete: the recording ended then.
        wait_logged(server, "boot profile recorded (the client said its boot is complete)")
        assert first["server"]["read_bytes"] > 0 and first["cache"]["misses"] > 0, first
        assert first["overlay"]["used"] > 0 and first["server"]["written_bytes"] == 0, first
        wait_logged(server, "boot profile recorded")

        second = boot()
        boot_set = second["boot_set"]
        assert boot_set["blocks"] > 0 and boot_set["local_at_start"] == boot_set["blocks"], second
        assert boot_set["fetched"] == 0 and second["cache"]["pinned"] == boot_set["blocks"], second
        assert second["cache"]["hits"] > 0, second
        assert second["server"]["read_bytes"] <= first["server"]["read_bytes"] // 10, (first, second)
    finally:
        server.stop()
    # The machine's writes stayed on the machine: the image and the server's overlays saw none.
    assert sha256(server.images / "netroot.img") == base
    log = server.log.read_text()
    written = [int(w.split("=")[1]) for w in log.split() if w.startswith("written_bytes=")]
    assert written and max(written) == 0, log


def test_a_machine_boots_through_the_agent_over_tls(tmp_path, artifacts):
    """`[nbd] tls = "require"`: the initramfs holds the CA certificate, the vdisk's command
    line names it (`osstream.tls_ca=`), and the agent speaks TLS to the server; a plain
    client is refused."""
    pki = make_pki(tmp_path / "pki", addresses=("127.0.0.1", "10.0.2.2"))
    server = netboot_server(tmp_path, artifacts, extra=(
        f'tls = "require"\ntls_certificate = "{pki}/server-cert.pem"\ntls_key = "{pki}/server-key.pem"\n'))
    agent_initrd(artifacts, server.images / "boot" / "initrd-agent.img",
                 files={"etc/osstream/ca-cert.pem": pki / "ca-cert.pem"})
    server.start()
    mac = "52:54:00:00:10:31"
    try:
        server.cli("vdisk", "add", "netroot", "--backend", "images", "--key", "netroot", "--boot", "linux-nbd",
                   "--kernel", "vmlinuz", "--initrd", "initrd-agent.img",
                   "--cmdline", "console=ttyS0 osstream.tls_ca=/etc/osstream/ca-cert.pem")
        server.cli("client", "add", mac, "--hostname", "tls-pc")
        server.cli("client", "assign", mac, "netroot")
        out = Machine(tmp_path, mac, bootfile(server), disk=cache_disk(tmp_path / "cache.img", "128M")).start().wait_exit()
        lines = console_lines(out)
        assert "agent serves /dev/nbd0" in lines, out[-3000:]
        assert f"marker={MARKER}" in lines and "sees written-by-tls-pc.txt" in lines, out[-3000:]
        assert lines[-1] == "done" and not [l for l in lines if l.startswith("agent-log")], out[-3000:]
        uri = server.cli("session", "open", mac, "netroot")
        assert uri.startswith("nbds://10.0.2.2:"), uri
        plain = subprocess.run(["nbdinfo", f"nbd://127.0.0.1:{server.port}/{uri.rsplit('/', 2)[-2]}/"
                                f"{uri.rsplit('/', 1)[1]}"], capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "NBD over TLS on TCP listeners tls=require" in log and "NBD client attached" in log, log


def test_a_debian_system_boots_through_the_agent_and_reboots_from_its_local_cache(tmp_path, artifacts):
    """Debian's own initramfs, with the agent hooked into its nbd script: the first boot
    streams from the server into the machine's local disk and is recorded as the vdisk's
    profile; the reboot reads its whole boot set from the local disk."""
    from netboot import DEBIAN_MARKER, build_debian, machine_id
    debian = build_debian()
    server = netboot_server(tmp_path, artifacts, extra='[profile]\nquiet = "8s"\n')
    subprocess.run(["cp", "--sparse=always", f"{debian}/debian.img", str(server.images / "debian.img")], check=True)
    shutil.copy(f"{debian}/vmlinuz-debian", server.images / "boot" / "vmlinuz-debian")
    debian_agent_initrd(debian, server.images / "boot" / "initrd-debian-agent.img")
    server.start()
    mac = "52:54:00:00:80:21"
    cache = cache_disk(tmp_path / "cache.img")
    try:
        base = sha256(server.images / "debian.img")
        server.cli("vdisk", "add", "debian", "--backend", "images", "--boot", "linux-nbd",
                   "--kernel", "vmlinuz-debian", "--initrd", "initrd-debian-agent.img", "--cmdline", "console=ttyS0")
        server.cli("client", "add", mac, "--hostname", "deb-agent")
        server.cli("client", "assign", mac, "debian")
        wanted = (f"debian: marker={DEBIAN_MARKER} hostname=deb-agent machine_id={machine_id(mac)} "
                  "target=active")

        def boot(n):
            where = tmp_path / f"boot{n}"
            where.mkdir()
            out = Machine(where, mac, bootfile(server), memory=768, disk=cache).start().wait_exit(timeout=400)
            assert wanted in out, out[-4000:]
            return agent_stats_on(cache)

        first = boot(1)
        assert first["writes"] == "local" and first["boot_set"]["blocks"] == 0, first
        assert first["server"]["read_bytes"] > 8 << 20 and first["server"]["written_bytes"] == 0, first
        wait_logged(server, "boot profile recorded")
        profile = json.loads(server.cli("--json", "profile", "show", "debian"))

        second = boot(2)
        boot_set = second["boot_set"]
        assert boot_set["blocks"] >= profile["boot_set_blocks"], (second, profile)
        assert boot_set["local_at_start"] == boot_set["blocks"] and boot_set["fetched"] == 0, second
        assert second["server"]["read_bytes"] <= first["server"]["read_bytes"] // 20, (first, second)
    finally:
        server.stop()
    assert sha256(server.images / "debian.img") == base
    written = [int(w.split("=")[1]) for w in server.log.read_text().split() if w.startswith("written_bytes=")]
    assert written and max(written) == 0


def counters(log, marker):
    """The `key=number` fields of the last log line containing `marker`."""
    line = [l for l in log.splitlines() if marker in l][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def stop_counters(server, marker):
    server.stop()
    return counters(server.log.read_text(), marker)


def test_relayed_requests_get_their_subnets_pool_and_garbage_is_dropped(tmp_path, artifacts, lab):
    """No guest: a DHCP relay agent (a namespace at 10.77.0.5 that also owns 10.88.0.1,
    the relayed subnet's gateway) forwards a DISCOVER with giaddr 10.88.0.1; osstream
    answers the relay from the [[pxe.relay]] pool of that subnet."""
    server = lan_server(tmp_path, artifacts, lab,
                        FULL_DHCP +
                        '[[pxe.relay]]\nrange_start = "10.88.0.100"\nrange_end = "10.88.0.110"\n'
                        'router = "10.88.0.1"\n')
    relay = lab.host("relay", 5)
    lab.exec(relay, "ip", "addr", "add", "10.88.0.1/24", "dev", "eth0")
    srv = server.wrap[-1]
    lab.exec(srv, "ip", "route", "add", "10.88.0.0/24", "via", f"{LAN}.5")
    server.start()
    code = (
        "import socket, struct, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('10.88.0.1', 67))\n"
        "s.settimeout(10)\n"
        "g = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"for junk in (b'', b'x' * 300, b'\\x01' * 240 + b'\\x63\\x82\\x53\\x63\\x35\\xff'):\n"
        f"    g.sendto(junk, ('{LAN}.1', 67))\n"
        "mac = bytes.fromhex('020000880001') + bytes(10)\n"
        "head = struct.pack('!BBBBIHH4s4s4s4s16s64s128s', 1, 1, 6, 1, 0x88, 0, 0, bytes(4), bytes(4), bytes(4),\n"
        "                   socket.inet_aton('10.88.0.1'), mac, b'', b'')\n"
        f"s.sendto(head + bytes([99, 130, 83, 99, 53, 1, 1, 255]), ('{LAN}.1', 67))\n"
        "data, addr = s.recvfrom(2048)\n"
        "print(socket.inet_ntoa(data[16:20]), socket.inet_ntoa(data[24:28]), addr[0])\n"
    )
    try:
        out = lab.exec(relay, "/usr/bin/python3", "-c", code).stdout.split()
    finally:
        server.stop()
    yiaddr, giaddr, sender = out
    assert yiaddr.startswith("10.88.0.1") and 100 <= int(yiaddr.split(".")[-1]) <= 110, out
    assert giaddr == "10.88.0.1" and sender == f"{LAN}.1"
    log = server.log.read_text()
    assert "pxe: malformed packet dropped" in log
    assert f"pxe: offer client=02:00:00:88:00:01 ip={yiaddr}" in log
