"""Running osstream as a system service: the shipped systemd unit and configuration, the
readiness protocol (Type=notify) on a NOTIFY_SOCKET the test owns, and SIGHUP. No test
writes to the host's /etc or needs systemd as PID 1."""

import os
import signal
import socket
import subprocess
import time

from conftest import BINARY, ROOT, Server, random_image

UNIT = os.path.join(ROOT, "packaging", "osstream.service")
SHIPPED = os.path.join(ROOT, "packaging", "osstream.toml")


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path):
    config = tmp_path / "osstream.toml"
    config.write_text(open(SHIPPED).read())
    unit = tmp_path / "osstream.service"
    unit.write_text(open(UNIT).read()
                    .replace("/usr/local/bin/osstream", BINARY)
                    .replace("/etc/osstream/osstream.toml", str(config)))
    # Documentation=man:osstream(1) is checked too: the pages `osstream man` writes.
    subprocess.run([BINARY, "man", str(tmp_path / "man" / "man1")], check=True, capture_output=True)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MANPATH": str(tmp_path / "man")})
    problems = [l for l in out.stderr.splitlines() if "osstream.service" in l]
    assert out.returncode == 0 and not problems, out.stderr
    text = open(UNIT).read()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_RAW", "StateDirectory=osstream", "User=osstream"):
        assert line in text


def test_the_shipped_configuration_loads_and_serves(tmp_path):
    out = subprocess.run([BINARY, "--config", SHIPPED, "config", "show"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'data_dir = "/var/lib/osstream"' in out.stdout
    # As the unit runs it, with the state and the listeners moved for the test.
    s = Server(tmp_path)
    http = socket.socket()
    http.bind(("127.0.0.1", 0))
    http_port = http.getsockname()[1]
    http.close()
    log = open(s.log, "w")
    proc = subprocess.Popen([BINARY, "--config", SHIPPED, "serve", "--data-dir", str(tmp_path / "state"),
                             "--listen", f"127.0.0.1:{s.port}"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OSSTREAM_HTTP__LISTEN": f"127.0.0.1:{http_port}"})
    try:
        s.proc, s.log_file = proc, log
        s.wait_ready()
        # No demo image on a boot server; the image folder inside data_dir is made.
        images = tmp_path / "state" / "images"
        assert images.is_dir() and not (images / "demo.img").exists(), list(images.iterdir())
        random_image(images / "os.img", 1 << 20, seed=3)
        out = subprocess.run(["nbdinfo", "--size", s.uri("os")], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.strip() == str(1 << 20), out
        assert (tmp_path / "state" / "catalog.db").is_file()
    finally:
        s.stop()


def test_ready_after_the_listeners_are_bound_reload_on_sighup_stopping_at_the_end(tmp_path):
    s = Server(tmp_path)
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    log = open(s.log, "w")
    proc = subprocess.Popen([BINARY, "--config", str(s.config), "serve"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)})
    try:
        message = listener.recv(4096).decode()
        assert message.startswith("READY=1\n") and "STATUS=serving" in message, message
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()  # bound before READY
        # A changed log filter applies at once; other changes are named as needing a restart.
        s.config.write_text(s.config.read_text() + '[log]\nfilter = "debug"\n[cache.ram]\ncapacity = "32MiB"\n')
        proc.send_signal(signal.SIGHUP)
        assert listener.recv(4096) == b"RELOADING=1"
        assert listener.recv(4096) == b"READY=1"
        text = s.log.read_text()
        assert "SIGHUP: log filter applied filter=debug" in text, text
        assert "take effect only when the server restarts keys=cache.ram.capacity" in text, text
        # A configuration that no longer loads leaves the running one in place.
        s.config.write_text(s.config.read_text() + "nonsense = 1\n")
        proc.send_signal(signal.SIGHUP)
        assert listener.recv(4096) == b"RELOADING=1"
        assert listener.recv(4096) == b"READY=1"
        assert "carries on with the one it started with" in s.log.read_text()
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
        # Back to the filter it started with: applied too.
        s.config.write_text(s.config.read_text().replace("nonsense = 1\n", "").replace('filter = "debug"', 'filter = "info"'))
        proc.send_signal(signal.SIGHUP)
        assert listener.recv(4096) == b"RELOADING=1"
        assert listener.recv(4096) == b"READY=1"
        assert "SIGHUP: log filter applied filter=info" in s.log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        listener.close()


def test_json_logs_name_the_client_session_and_vdisk_on_lines_about_a_client(make_server, tmp_path):
    import json

    import nbd

    from conftest import random_image
    s = make_server('[log]\nformat = "json"\n[backends.images]\nkind = "file"\nroot = "images"\nwritable = true\n'
                    '[sessions]\nram_capacity = "256KiB"\n'
                    '[nbd]\nbase_exports = false\nlisten = ["127.0.0.1:PORT"]\n', start=False, demo=False)
    random_image(s.images / "deb.img", 4 << 20, seed=3)
    s.start()
    s.cli("vdisk", "add", "deb", "--backend", "images", "--write-cache", "ram")
    s.cli("client", "add", "aa:bb:cc:00:00:09")
    s.cli("client", "assign", "aa:bb:cc:00:00:09", "deb")
    uri = s.cli("session", "open", "aa:bb:cc:00:00:09", "deb")
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for i in range(8):  # past the 256 KiB overlay: ENOSPC, logged as a failed request
            h.pwrite(b"z" * 65536, i * 65536)
    except nbd.Error:
        pass
    h.shutdown()
    s.stop()
    lines = [json.loads(line) for line in s.log.read_text().splitlines() if line.strip()]
    assert all("timestamp" in l and "level" in l and "fields" in l for l in lines)
    about_client = [l for l in lines if l["fields"].get("message") in ("NBD client attached", "request failed",
                                                                        "NBD client detached")]
    assert {l["fields"]["message"] for l in about_client} == {"NBD client attached", "request failed",
                                                              "NBD client detached"}, about_client
    for line in about_client:
        span = line["span"]
        assert span["name"] == "client" and span["mac"] == "aa:bb:cc:00:00:09" and span["vdisk"] == "deb", line
        assert span["session"] and span["protocol"] == "nbd", line
