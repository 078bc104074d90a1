"""The TFTP server with real clients (curl, tftp-hpa) and a small client of the test's own
for what those cannot ask for (windowsize, lost ACKs, block roll-over, bad packets)."""

import os
import socket
import struct
import subprocess
import threading

import pytest

from conftest import Server, random_image


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tftp_server(tmp_path, extra=""):
    port = free_udp_port()
    root = tmp_path / "tftp"
    root.mkdir()
    server = Server(tmp_path, config_extra=(
        f'[tftp]\nenabled = true\nlisten = "127.0.0.1:{port}"\nroot = "{root}"\ntimeout = "1s"\n{extra}\n'),
        demo=False)
    server.tftp_port = port
    server.tftp_root = root
    return server


@pytest.fixture
def tftp(tmp_path):
    server = tftp_server(tmp_path)
    random_image(server.tftp_root / "ipxe.efi", 1 << 20, seed=7)
    (server.tftp_root / "pxelinux.cfg").mkdir()
    (server.tftp_root / "pxelinux.cfg" / "default").write_text("DEFAULT linux\n")
    (server.tftp_root / "empty").write_bytes(b"")
    random_image(server.tftp_root / "exact", 512 * 4, seed=8)
    server.start()
    yield server
    server.stop()


def rrq(name, mode="octet", **options):
    body = f"{name}\0{mode}\0" + "".join(f"{k}\0{v}\0" for k, v in options.items())
    return struct.pack("!H", 1) + body.encode()


class Client:
    """A TFTP client that does exactly what the test says."""

    def __init__(self, port, timeout=5):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.server = ("127.0.0.1", port)
        self.peer = None

    def send(self, data, to=None):
        self.sock.sendto(data, to or self.peer or self.server)

    def recv(self):
        data, addr = self.sock.recvfrom(70000)
        self.peer = addr
        return data

    def ack(self, block):
        self.send(struct.pack("!HH", 4, block % 65536))

    def close(self):
        self.sock.close()


def options_of(oack):
    fields = oack[2:].split(b"\0")[:-1]
    return {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}


def fetch(client, name, **options):
    """Reads a whole file with the given options; returns (bytes, granted options)."""
    client.send(rrq(name, **options))
    granted = {}
    blksize = 512
    window = 1
    first = client.recv()
    if struct.unpack("!H", first[:2])[0] == 6:
        granted = options_of(first)
        blksize = int(granted.get("blksize", 512))
        window = int(granted.get("windowsize", 1))
        client.ack(0)
        packet = client.recv()
    else:
        packet = first
    data = bytearray()
    expected = 1
    in_window = 0
    while True:
        op, block = struct.unpack("!HH", packet[:4])
        assert op == 3, packet
        assert block == expected % 65536, (block, expected)
        payload = packet[4:]
        data += payload
        in_window += 1
        last = len(payload) < blksize
        if last or in_window == window:
            client.ack(expected)
            in_window = 0
        if last:
            return bytes(data), granted
        expected += 1
        packet = client.recv()


def test_curl_and_tftp_hpa_fetch_files_whole(tftp):
    want = (tftp.tftp_root / "ipxe.efi").read_bytes()
    out = subprocess.run(["curl", "-s", "--fail", f"tftp://127.0.0.1:{tftp.tftp_port}/ipxe.efi"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout == want
    target = tftp.tftp_root.parent / "fetched"
    out = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(tftp.tftp_port), "-c", "get",
                          "pxelinux.cfg/default", str(target)], capture_output=True, text=True, timeout=60)
    assert target.read_text() == "DEFAULT linux\n", out.stdout + out.stderr


def test_options_are_granted_within_the_servers_limits(tftp):
    client = Client(tftp.tftp_port)
    data, granted = fetch(client, "ipxe.efi", blksize=1432, tsize=0, timeout=2, windowsize=64)
    assert granted == {"blksize": "1432", "tsize": str(1 << 20), "timeout": "2", "windowsize": "16"}
    assert data == (tftp.tftp_root / "ipxe.efi").read_bytes()
    for name in ("empty", "exact"):
        data, _ = fetch(Client(tftp.tftp_port), name)
        assert data == (tftp.tftp_root / name).read_bytes()
    client.close()


def test_block_numbers_roll_over_past_65535(tftp):
    random_image(tftp.tftp_root / "big", 70_000 * 16 + 5, seed=9)
    data, granted = fetch(Client(tftp.tftp_port, timeout=10), "big", blksize=16, windowsize=16)
    assert granted["blksize"] == "16"
    assert data == (tftp.tftp_root / "big").read_bytes()


def test_a_lost_ack_is_answered_by_a_retransmission(tftp):
    client = Client(tftp.tftp_port)
    client.send(rrq("pxelinux.cfg/default"))
    first = client.recv()
    again = client.recv()  # no ACK sent: the server sends block 1 again after its timeout
    assert first == again and first[:4] == b"\x00\x03\x00\x01"
    client.ack(1)
    client.close()


def test_many_clients_at_once(tftp):
    want = (tftp.tftp_root / "ipxe.efi").read_bytes()
    results = []

    def one():
        out = subprocess.run(["curl", "-s", "--fail", "--tftp-blksize", "1428",
                              f"tftp://127.0.0.1:{tftp.tftp_port}/ipxe.efi"], capture_output=True, timeout=120)
        results.append(out.returncode == 0 and out.stdout == want)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20


def error_of(client, request):
    client.send(request, to=client.server)
    packet = client.recv()
    op, code = struct.unpack("!HH", packet[:4])
    assert op == 5, packet
    return code, packet[4:-1].decode()


def test_names_never_leave_the_root(tftp, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    os.symlink(secret, tftp.tftp_root / "link-out")
    os.symlink("ipxe.efi", tftp.tftp_root / "link-in")
    client = Client(tftp.tftp_port)
    for name in ("../secret.txt", "pxelinux.cfg/../../secret.txt", "link-out", str(secret)):
        code, message = error_of(client, rrq(name))
        assert code in (1, 2), (name, code, message)
        assert "outside" not in message
    code, _ = error_of(client, rrq("pxelinux.cfg"))
    assert code == 2
    code, _ = error_of(client, rrq("missing"))
    assert code == 1
    # A link that stays inside is followed; a leading / means the root.
    assert fetch(Client(tftp.tftp_port), "link-in")[0] == (tftp.tftp_root / "ipxe.efi").read_bytes()
    assert fetch(Client(tftp.tftp_port), "/pxelinux.cfg/default")[0] == b"DEFAULT linux\n"


def test_writes_and_other_modes_are_refused(tftp):
    client = Client(tftp.tftp_port)
    code, message = error_of(client, struct.pack("!H", 2) + b"new\0octet\0")
    assert code == 2 and "read-only" in message
    code, message = error_of(Client(tftp.tftp_port), rrq("ipxe.efi", mode="netascii"))
    assert code == 4 and "binary" in message
    assert not (tftp.tftp_root / "new").exists()


def test_malformed_packets_are_dropped_and_the_server_keeps_serving(tftp):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for junk in (b"", b"\x00", b"\x00\x01no-nul", b"\x00\x09\x00\x01", b"\xff" * 600, b"\x00\x01\x00octet\x00",
                 b"\x00\x04\x00\x01\x02"):
        sock.sendto(junk, ("127.0.0.1", tftp.tftp_port))
    sock.close()
    data, _ = fetch(Client(tftp.tftp_port), "pxelinux.cfg/default")
    assert data == b"DEFAULT linux\n"
    log = tftp.log.read_text()
    assert "tftp: malformed packet dropped" in log
    assert tftp.alive()


def test_files_can_come_from_a_backends_boot_files(tmp_path):
    server = tftp_server(tmp_path, extra='backend = "images"')
    boot = server.images / "boot"
    boot.mkdir()
    random_image(boot / "undionly.kpxe", 70_000, seed=10)
    server.start()
    try:
        data, _ = fetch(Client(server.tftp_port), "undionly.kpxe", blksize=1432)
        assert data == (boot / "undionly.kpxe").read_bytes()
        code, _ = error_of(Client(server.tftp_port), rrq("../images/x.img"))
        assert code == 2
    finally:
        server.stop()


def test_a_missing_root_stops_the_server_with_advice(tmp_path):
    server = Server(tmp_path, config_extra=(
        f'[tftp]\nenabled = true\nlisten = "127.0.0.1:{free_udp_port()}"\nroot = "/nonexistent/tftp"\n'),
        demo=False)
    with pytest.raises(RuntimeError, match="tftp.root /nonexistent/tftp cannot be served"):
        server.start()


def test_long_timeouts_are_not_granted_and_errors_name_no_server_paths(tftp):
    client = Client(tftp.tftp_port)
    client.send(rrq("pxelinux.cfg/default", timeout=200, blksize=1024))
    oack = client.recv()
    granted = options_of(oack)
    assert granted == {"blksize": "1024"}  # timeout 200 left out (RFC 2349 allows it)
    # A stray ACK during negotiation is not answered with another OACK.
    client.ack(5)
    client.ack(0)
    data = client.recv()
    assert data[:4] == b"\x00\x03\x00\x01"
    client.ack(1)
    code, message = error_of(Client(tftp.tftp_port), rrq("missing"))
    assert code == 1 and message == "file not found"
    assert str(tftp.tftp_root) not in message
