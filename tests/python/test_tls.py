"""NBD over TLS (STARTTLS, X.509) with the clients that use it: libnbd's nbdinfo/nbdcopy
(`nbds://`), qemu-img with `tls-creds-x509`, Debian's nbd-client with its certificate
options, and the osstream agent. Certificates are made here with openssl; a recording
proxy checks what crosses the wire."""

import os
import socket
import subprocess
import time

import nbd
import pytest

from conftest import BINARY, TcpRelay, free_port, make_pki, random_image, sha256

AGENT = os.path.join(os.path.dirname(BINARY), "osstream-agent")
MIB = 1 << 20
MAC = "aa:bb:cc:00:00:01"


def tls_toml(pki, mode="require", client_ca=False):
    return (f'tls = "{mode}"\ntls_certificate = "{pki}/server-cert.pem"\ntls_key = "{pki}/server-key.pem"\n'
            + (f'tls_client_ca = "{pki}/ca-cert.pem"\n' if client_ca else ""))


def build(make_server, tmp_path, mode="require", client_ca=False, base_exports=False):
    pki = make_pki(tmp_path / "pki")
    http = free_port()
    s = make_server('[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    f'[http]\nenabled = true\nlisten = "127.0.0.1:{http}"\n'
                    f'[nbd]\nbase_exports = {str(base_exports).lower()}\nlisten = ["127.0.0.1:PORT"]\n'
                    + tls_toml(pki, mode, client_ca), start=False, demo=False)
    s.pki, s.http_port = pki, http
    random_image(s.images / "deb.img", 8 * MIB, seed=11)
    random_image(s.images / "dev.img", 4 * MIB, seed=12)
    s.start()
    s.cli("vdisk", "add", "deb", "--backend", "images")
    s.cli("vdisk", "add", "dev", "--backend", "images", "--mode", "private")
    s.cli("client", "add", MAC)
    s.cli("client", "assign", MAC, "deb")
    s.cli("client", "assign", MAC, "dev")
    return s


def open_session(s, vdisk="deb"):
    uri = s.cli("session", "open", MAC, vdisk)
    assert uri.startswith(f"nbds://127.0.0.1:{s.port}/s/"), uri
    return uri


def with_certs(uri, pki):
    return f"{uri}?tls-certificates={pki}"


def nbdinfo(*args):
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LIBNBD_DEBUG": "1"})


def test_require_serves_nbds_clients_and_refuses_plain_ones(make_server, tmp_path):
    s = build(make_server, tmp_path)
    uri = open_session(s)
    out = nbdinfo("--size", with_certs(uri, s.pki))
    assert out.returncode == 0 and out.stdout.strip() == str(8 * MIB), out.stderr
    # nbdcopy reads the disk byte for byte through TLS, and writes through it.
    copy = tmp_path / "copy.img"
    subprocess.run(["nbdcopy", with_certs(uri, s.pki), str(copy)], check=True, timeout=120)
    assert sha256(copy) == sha256(s.images / "deb.img")
    patch = tmp_path / "patch.img"
    random_image(patch, 8 * MIB, seed=99)
    subprocess.run(["nbdcopy", str(patch), with_certs(uri, s.pki)], check=True, timeout=120)
    subprocess.run(["nbdcopy", with_certs(uri, s.pki), str(copy)], check=True, timeout=120)
    assert sha256(copy) == sha256(patch)
    # In clear, the server answers only that TLS is required.
    plain = nbdinfo(uri.replace("nbds://", "nbd://"))
    assert plain.returncode != 0
    assert "this server requires TLS" in plain.stderr, plain.stderr
    # A certificate from another CA is not trusted by the client.
    other = tmp_path / "other"
    other.mkdir()
    (other / "ca-cert.pem").write_text((s.pki / "other-ca-cert.pem").read_text())
    assert nbdinfo("--size", with_certs(uri, other)).returncode != 0
    assert s.alive()
    log = s.log.read_text()
    assert "NBD over TLS on TCP listeners tls=require" in log, log
    # The test certificates last two days: the admin hears so; they do name 127.0.0.1.
    assert "server-cert.pem expires in " in log, log
    assert "does not name" not in log, log


def test_the_token_and_the_data_never_cross_the_wire_in_clear(make_server, tmp_path):
    s = build(make_server, tmp_path, mode="on")
    uri = open_session(s)
    token = uri.rsplit("/s/", 1)[1]
    data = (s.images / "deb.img").read_bytes()[MIB:MIB + 4096]
    for scheme, expect_clear in (("nbds", False), ("nbd", True)):
        proxy = TcpRelay(s.port, record=True)
        proxied = f"{scheme}://127.0.0.1:{proxy.port}/s/{token}"
        if scheme == "nbds":
            # The certificate names 127.0.0.1, the proxy's address too.
            proxied = with_certs(proxied, s.pki)
        pattern = b"osstream on the wire"
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri(proxied)
        h.pwrite(pattern * 50, 2 * MIB)
        assert h.pread(4096, MIB) == data
        h.shutdown()
        proxy.close()
        sent = bytes(proxy.sent)
        assert (token.encode() in sent) == expect_clear, scheme
        assert (pattern in sent) == expect_clear, scheme


def test_qemu_img_and_debian_nbd_client_with_their_certificate_options(make_server, tmp_path):
    s = build(make_server, tmp_path, base_exports=True)
    uri = open_session(s)
    export = uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[1]
    creds = ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={s.pki}"]
    opts = f"driver=nbd,host=127.0.0.1,port={s.port},export={export},tls-creds=tls0"
    out = subprocess.run(["qemu-img", "info", *creds, "--image-opts", opts], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and f"virtual size: 8 MiB ({8 * MIB} bytes)" in out.stdout, out.stderr
    target = tmp_path / "qemu.raw"
    subprocess.run(["qemu-img", "convert", *creds, "--image-opts", opts, "-O", "raw", str(target)], check=True,
                   timeout=120)
    assert sha256(target) == sha256(s.images / "deb.img")
    # Debian's nbd-client (the one that boots machines): listing needs no /dev/nbd device.
    tls = ["-enable-tls", "-cacertfile", str(s.pki / "ca-cert.pem"), "-certfile", str(s.pki / "client-cert.pem"),
           "-keyfile", str(s.pki / "client-key.pem"), "-tlshostname", "127.0.0.1"]
    out = subprocess.run(["nbd-client", "-l", "127.0.0.1", str(s.port), *tls], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "deb" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(["nbd-client", "-l", "127.0.0.1", str(s.port)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "deb" not in out.stdout, out.stdout + out.stderr


def test_client_certificates_when_the_server_asks_for_them(make_server, tmp_path):
    s = build(make_server, tmp_path, client_ca=True)
    uri = open_session(s)
    out = nbdinfo("--size", with_certs(uri, s.pki))
    assert out.returncode == 0, out.stderr
    # A client without a certificate (only the CA), or with one of another CA, cannot.
    for name, files in (("no-cert", {"ca-cert.pem": "ca-cert.pem"}),
                        ("rogue", {"ca-cert.pem": "ca-cert.pem", "client-cert.pem": "rogue-cert.pem",
                                   "client-key.pem": "rogue-key.pem"})):
        folder = tmp_path / name
        folder.mkdir()
        for target, source in files.items():
            (folder / target).write_text((s.pki / source).read_text())
        assert nbdinfo("--size", with_certs(uri, folder)).returncode != 0, name
    assert s.alive()
    assert "NBD TLS handshake failed" in s.log.read_text()


def test_the_agent_speaks_tls_to_the_server(make_server, tmp_path):
    s = build(make_server, tmp_path, client_ca=True)
    uri = open_session(s, "dev")
    token = uri.rsplit("/s/", 1)[1]
    sock = tmp_path / "agent.sock"
    base = [AGENT, "run", "--nbd", f"127.0.0.1:{s.port}", "--export", f"s/{token}", "--socket", str(sock)]
    # Without credentials the agent stops at once and says what it needs.
    out = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "requires TLS: give the agent --tls-ca" in out.stderr, out.stderr
    log = open(tmp_path / "agent.log", "w")
    tls = ["--tls-ca", str(s.pki / "ca-cert.pem"), "--tls-cert", str(s.pki / "client-cert.pem"),
           "--tls-key", str(s.pki / "client-key.pem")]
    proc = subprocess.Popen(base + tls, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while "agent: serving the disk" not in (tmp_path / "agent.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "agent.log").read_text()
            time.sleep(0.05)
        local = f"nbd+unix:///disk?socket={sock}"
        copy = tmp_path / "copy.img"
        subprocess.run(["nbdcopy", local, str(copy)], check=True, timeout=120)
        assert sha256(copy) == sha256(s.images / "dev.img")
        h = nbd.NBD()
        h.connect_uri(local)
        h.pwrite(b"through the agent" * 10, 4096)
        h.flush()
        h.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # The private vdisk's write reached the server's image through TLS.
    assert (s.images / "dev.img").read_bytes()[4096:4096 + 170] == b"through the agent" * 10


def test_plaintext_sent_after_starttls_is_never_taken_as_encrypted(make_server, tmp_path):
    s = build(make_server, tmp_path)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    assert len(sock.recv(18)) == 18
    starttls = b"IHAVEOPT" + (5).to_bytes(4, "big") + (0).to_bytes(4, "big")
    go = b"IHAVEOPT" + (7).to_bytes(4, "big") + (10).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"deb\0\0\0"
    # Flags, STARTTLS and, in the same packet, an option that must not be read in clear.
    sock.sendall((1).to_bytes(4, "big") + starttls + go)
    reply = sock.recv(20)
    assert reply[8:12] == (5).to_bytes(4, "big") and reply[12:16] == (1).to_bytes(4, "big")  # ACK
    assert sock.recv(100) == b""  # closed
    sock.close()
    deadline = time.time() + 10
    while "sent data after STARTTLS" not in s.log.read_text():
        assert time.time() < deadline, s.log.read_text()
        time.sleep(0.05)
    assert s.alive()


@pytest.mark.parametrize("extra, message", [
    ('tls = "on"\n', 'nbd.tls = "on" needs nbd.tls_certificate and nbd.tls_key'),
    ('tls = "require"\ntls_certificate = "/nonexistent/cert.pem"\ntls_key = "/nonexistent/key.pem"\n',
     "nbd.tls_certificate /nonexistent/cert.pem"),
    ('tls_client_ca = "/x.pem"\n', 'nbd.tls_client_ca is set but nbd.tls = "off"'),
    ('tls = "sometimes"\n', "sometimes"),
])
def test_tls_configuration_errors_are_named(make_server, extra, message):
    s = make_server('[nbd]\nlisten = ["127.0.0.1:PORT"]\n' + extra, start=False)
    s.start(wait=False)
    assert s.proc.wait(timeout=60) != 0
    assert message in s.log.read_text(), s.log.read_text()


def test_a_certificate_that_does_not_name_the_public_address_is_warned_about(make_server, tmp_path):
    pki = make_pki(tmp_path / "pki")
    s = make_server('[nbd]\nlisten = ["127.0.0.1:PORT"]\npublic_address = "boot.lab"\n' + tls_toml(pki), start=False)
    s.start()
    log = s.log.read_text()
    assert "does not name boot.lab in its subjectAltName, and boot.lab is what clients connect to (the [nbd] public_address)" in log, log
    assert s.alive()
