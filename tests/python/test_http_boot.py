"""The HTTP boot server with real HTTP clients (no guest): iPXE scripts from the catalog,
boot files and HTTP SAN with ranges, the session rules, and bad requests."""

import http.client
import socket
import urllib.request

import pytest

from conftest import Server, free_port, random_image, sha256


def http_server(tmp_path, extra=""):
    port = free_port()
    server = Server(tmp_path, config_extra=(
        f'[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\nmenu_timeout = "3s"\n{extra}\n'
        '[nbd]\nlisten = ["127.0.0.1:PORT"]\n'), demo=False)
    server.http_port = port
    boot = server.images / "boot"
    boot.mkdir()
    random_image(boot / "vmlinuz", 3 << 20, seed=1)
    random_image(boot / "initrd.img", 1 << 20, seed=2)
    random_image(server.images / "root.img", 16 << 20, seed=3)
    random_image(server.images / "disk.img", 16 << 20, seed=4)
    return server.start()


def get(server, path, headers=None, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp, body


def script(server, path):
    resp, body = get(server, path)
    assert resp.status == 200, body
    text = body.decode()
    assert text.startswith("#!ipxe\n")
    return text


def token_in(text, prefix):
    start = text.index(prefix) + len(prefix)
    return text[start:].split("/")[0].split()[0]


def setup_lab(server):
    server.cli("vdisk", "add", "linux", "--backend", "images", "--key", "root", "--boot", "linux-nbd",
               "--kernel", "vmlinuz", "--initrd", "initrd.img", "--cmdline", "console=ttyS0 quiet",
               "--description", "Lab Linux")
    server.cli("vdisk", "add", "disk", "--backend", "images", "--boot", "sanboot", "--description", "SAN disk")
    server.cli("client", "add", "52:54:00:aa:00:01", "--hostname", "pc-one")
    server.cli("client", "assign", "52:54:00:aa:00:01", "linux")


@pytest.fixture
def lab(tmp_path):
    server = http_server(tmp_path)
    setup_lab(server)
    yield server
    server.stop()


def test_every_client_starts_at_boot_ipxe_and_is_chained_to_its_own_script(lab):
    text = script(lab, "/boot.ipxe")
    assert f"chain --autofree http://127.0.0.1:{lab.http_port}/ipxe/${{mac:hexhyp}}" in text


def test_one_vdisk_boots_at_once_with_its_session_on_the_kernel_command_line(lab):
    text = script(lab, "/ipxe/52-54-00-AA-00-01")
    token = token_in(text, "/boot/")
    assert f"/boot/{token}/kernel initrd=initrd console=ttyS0 quiet root=/dev/nbd0 " in text
    assert f"nbdroot=127.0.0.1:{lab.port}/s/{token} " in text
    assert "systemd.hostname=pc-one systemd.machine_id=" in text
    assert f"initrd --name initrd http://127.0.0.1:{lab.http_port}/boot/{token}/initrd" in text
    sessions = lab.cli("session", "list")
    assert "52:54:00:aa:00:01" in sessions and "linux" in sessions
    # The session's boot files, whole and in ranges.
    resp, body = get(lab, f"/boot/{token}/kernel")
    assert resp.status == 200 and body == (lab.images / "boot" / "vmlinuz").read_bytes()
    resp, body = get(lab, f"/boot/{token}/initrd", {"Range": "bytes=1000-1999"})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes 1000-1999/{1 << 20}"
    assert body == (lab.images / "boot" / "initrd.img").read_bytes()[1000:2000]
    resp, body = get(lab, f"/boot/{token}/initrd", {"Range": f"bytes={1 << 20}-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{1 << 20}"
    resp, body = get(lab, f"/boot/{token}/kernel", method="HEAD")
    assert resp.status == 200 and resp.getheader("Content-Length") == str(3 << 20) and body == b""


def test_a_new_boot_replaces_the_session_and_the_old_token_reaches_nothing(lab):
    old = token_in(script(lab, "/ipxe/52:54:00:aa:00:01"), "/boot/")
    new = token_in(script(lab, "/ipxe/52:54:00:aa:00:01"), "/boot/")
    assert old != new
    assert get(lab, f"/boot/{old}/kernel")[0].status == 404
    assert get(lab, f"/boot/{new}/kernel")[0].status == 200
    assert get(lab, "/boot/not-a-token/kernel")[0].status == 404
    assert get(lab, f"/boot/{new}/vmlinuz")[0].status == 404


def test_several_vdisks_make_a_menu_and_each_entry_opens_its_own_session(lab):
    lab.cli("client", "assign", "52:54:00:aa:00:01", "disk", "--default")
    text = script(lab, "/ipxe/52-54-00-aa-00-01")
    assert "menu osstream: pc-one (52:54:00:aa:00:01)" in text
    assert text.index("item vd0 linux - Lab Linux") < text.index("item vd1 disk - SAN disk")
    assert "choose --default vd1 --timeout 3000 target" in text
    assert "token" not in text and "/boot/" not in text  # the menu opens no session
    san = script(lab, "/ipxe/52-54-00-aa-00-01/disk")
    token = token_in(san, "/san/")
    assert f"sanboot http://127.0.0.1:{lab.http_port}/san/{token}" in san


def test_http_san_serves_the_disk_in_ranges_on_one_keep_alive_connection(lab):
    lab.cli("client", "assign", "52:54:00:aa:00:01", "disk")
    token = token_in(script(lab, "/ipxe/52-54-00-aa-00-01/disk"), "/san/")
    image = (lab.images / "disk.img").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", lab.http_port, timeout=10)
    conn.request("HEAD", f"/san/{token}")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and int(resp.getheader("Content-Length")) == len(image)
    assert resp.getheader("Accept-Ranges") == "bytes"
    for start, length in [(0, 512), (1 << 20, 52 * 1024), (len(image) - 4096, 4096), (7, 1)]:
        conn.request("GET", f"/san/{token}", headers={"Range": f"bytes={start}-{start + length - 1}"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 206
        assert body == image[start:start + length]
    conn.close()
    before = sha256(lab.images / "disk.img")
    assert before == sha256(image)


def test_clients_reach_only_their_own_vdisks_by_every_path(lab):
    # A vdisk not assigned to the client: no session, a message.
    text = script(lab, "/ipxe/52-54-00-aa-00-01/disk")
    assert "is not assigned to 52:54:00:aa:00:01" in text and "sanboot" not in text
    # Another client's token does not open a SAN it was not given for: the session
    # reaches its own vdisk only (linux), never `disk`.
    token = token_in(script(lab, "/ipxe/52-54-00-aa-00-01/linux"), "/boot/")
    resp, body = get(lab, f"/san/{token}", {"Range": "bytes=0-511"})
    assert resp.status == 206
    assert body == (lab.images / "root.img").read_bytes()[:512]
    # A disabled vdisk stays on the menu but does not boot.
    lab.cli("vdisk", "set", "linux", "--disable")
    text = script(lab, "/ipxe/52-54-00-aa-00-01/linux")
    assert "is disabled" in text and "kernel" not in text


def test_a_private_vdisk_held_by_one_client_is_refused_to_another(tmp_path):
    server = http_server(tmp_path, extra='[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n')
    try:
        setup_lab(server)
        random_image(server.images / "own.img", 16 << 20, seed=5)
        server.cli("vdisk", "add", "mine", "--backend", "images", "--key", "own", "--boot", "sanboot",
                   "--mode", "private")
        server.cli("client", "add", "52:54:00:aa:00:02")
        for mac in ("52:54:00:aa:00:01", "52:54:00:aa:00:02"):
            server.cli("client", "assign", mac, "mine")
        first = script(server, "/ipxe/52-54-00-aa-00-01/mine")
        assert "sanboot" in first
        second = script(server, "/ipxe/52-54-00-aa-00-02/mine")
        assert "sanboot" not in second, second
        assert 'private vdisk "mine" is in use by session' in second
    finally:
        server.stop()


def test_unknown_clients_follow_the_policy(tmp_path):
    server = http_server(tmp_path)
    try:
        setup_lab(server)
        text = script(server, "/ipxe/52-54-00-bb-00-09")
        assert "(52:54:00:bb:00:09) is not registered" in text
        assert "52:54:00:bb:00:09" not in server.cli("client", "list")
        server.cli("policy", "set", "register-and-assign:52:54:00:aa:00:01")
        text = script(server, "/ipxe/52-54-00-bb-00-09")
        assert "kernel --name kernel" in text
        listing = server.cli("client", "show", "52:54:00:bb:00:09")
        assert "linux" in listing
    finally:
        server.stop()


def raw(server, payload, read=True):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(payload)
        if not read:
            return b""
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk


def test_bad_requests_get_a_status_and_the_server_keeps_serving(lab):
    assert raw(lab, b"\x00\x01\x02garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(lab, b"POST /boot.ipxe HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").startswith(b"HTTP/1.1 405 ")
    assert raw(lab, b"GET /boot.ipxe HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 431 ")
    assert raw(lab, b"GET /boot/../../etc/passwd HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(lab, b"GET /ipxe/not-a-mac HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(lab, b"GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    raw(lab, b"GET /boot.ipxe HTTP/1.1\r\nHost: x", read=False)  # half a head, then gone
    # Still serving, and keep-alive still works for well-behaved clients.
    with urllib.request.urlopen(f"http://127.0.0.1:{lab.http_port}/boot.ipxe", timeout=10) as resp:
        assert resp.status == 200
    assert lab.alive()


def test_session_tokens_never_reach_the_log(lab):
    lab.cli("client", "assign", "52:54:00:aa:00:01", "disk")
    tokens = [token_in(script(lab, "/ipxe/52-54-00-aa-00-01/linux"), "/boot/"),
              token_in(script(lab, "/ipxe/52-54-00-aa-00-01/disk"), "/san/")]
    get(lab, f"/boot/{tokens[0]}/kernel")
    get(lab, f"/san/{tokens[1]}", {"Range": "bytes=0-1"})
    get(lab, f"/boot/{tokens[0]}/kernel")  # ended: refused, and logged
    log = lab.log.read_text()
    assert "boot session opened" in log
    for token in tokens:
        assert token not in log


def test_a_bad_http_table_stops_the_server_with_a_clear_error(tmp_path):
    server = Server(tmp_path, config_extra='[http]\nenabled = true\nlisten = "nowhere"\n', demo=False)
    with pytest.raises(RuntimeError, match="http.listen"):
        server.start()
    server = Server(tmp_path, config_extra='[http]\nenabled = true\npublic_url = "https://x"\n', demo=False)
    with pytest.raises(RuntimeError, match="http.public_url"):
        server.start()


def test_a_head_request_opens_no_session(lab):
    resp, body = get(lab, "/ipxe/52-54-00-aa-00-01", method="HEAD")
    assert resp.status == 200 and body == b""
    resp, body = get(lab, "/ipxe/52-54-00-aa-00-01/linux", method="HEAD")
    assert resp.status == 200
    assert "52:54:00:aa:00:01" not in lab.cli("session", "list")


def test_tokens_stay_out_of_the_log_however_the_path_is_spelled(lab):
    token = token_in(script(lab, "/ipxe/52-54-00-aa-00-01/linux"), "/boot/")
    for path in (f"//boot/{token}/kernel", f"///san/{token}", f"//boot/{token}/initrd"):
        get(lab, path)
    script(lab, "/ipxe/52-54-00-aa-00-01/linux")  # ends that session
    for path in (f"//boot/{token}/kernel", f"//san/{token}"):
        assert get(lab, path)[0].status == 404
    assert token not in lab.log.read_text()
