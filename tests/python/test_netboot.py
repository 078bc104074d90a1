"""Real machines boot from osstream over the network: qemu (TCG) with its iPXE ROM fetches
/boot.ipxe, gets its own script or menu from the catalog, loads kernel and initrd over
HTTP and mounts its root over NBD from its session (or boots a disk over HTTP SAN).

The guest's initramfs (tests/netboot/init.sh) reads the kernel command line osstream
wrote, prints what it sees with a `netboot:` prefix and powers off. Each boot takes
10-30 s under TCG, so these run one machine at a time except where two must boot at once.
"""

import threading

import pytest

from conftest import sha256
from netboot import (MARKER, SAN_MARKER, Machine, add_linux_vdisk, build_artifacts, console_lines,
                     netboot_server)


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
        machine.start().wait_for("is not registered on this server")
        machine.kill()
        assert f"osstream client add {mac}" in machine.unwrapped()
        assert mac not in server.cli("client", "list")

        server.cli("policy", "set", "register")
        machine = Machine(tmp_path, mac, bootfile(server))
        machine.start().wait_for("has no vdisk assigned")
        machine.kill()
        assert mac in server.cli("client", "list")
    finally:
        server.stop()
