"""Fixtures that start and stop real osstream servers on loopback for the tests."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test, for `_drop_tmp_path_of_passed_tests`."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(autouse=True)
def _drop_tmp_path_of_passed_tests(request, tmp_path):
    """Removes a passed test's tmp_path once its servers are stopped: images, caches and
    guests' disks of 200 tests add up to gigabytes (a failed test's folder stays, to
    read). Taking tmp_path sets it up first, so this runs after every fixture that uses it
    is torn down."""
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.passed:
        shutil.rmtree(tmp_path, ignore_errors=True)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BINARY = os.environ.get("TEST_OSSTREAM_BIN", os.path.join(TARGET, "debug", "osstream"))


def wait_for(what, predicate, timeout=30):
    """Polls `predicate` until it holds; fails naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class TcpRelay:
    """Forwards a loopback port to `host`:`target`: `record` keeps every byte clients sent
    (`sent`); `move` sends new connections elsewhere and drops the open ones, as when
    keepalived moves a floating address off a server that died."""

    def __init__(self, target, record=False, host="127.0.0.1"):
        self.target, self.host, self.record, self.sent = target, host, record, bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, upstream]
            threading.Thread(target=self.pipe, args=(client, upstream, self.record), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client, False), daemon=True).start()

    def pipe(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def move(self, target, host=None):
        self.target, self.host = target, host or self.host
        with self.lock:
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.open.clear()

    def close(self):
        self.listener.close()
        self.move(self.target)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(path_or_bytes):
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return hashlib.sha256(path_or_bytes).hexdigest()
    h = hashlib.sha256()
    with open(path_or_bytes, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def random_image(path, size, seed, holes=()):
    """Writes `size` pseudo-random bytes (reproducible by seed), then punches `holes`."""
    import random
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n
    for offset, length in holes:
        subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length", str(length), path], check=True)


class Server:
    """One `osstream serve` process with its own data dir and port."""

    def __init__(self, tmp_path, config_extra="", demo=True, listen=None):
        self.data_dir = tmp_path / "data"
        self.images = self.data_dir / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.listen = listen or [f"127.0.0.1:{self.port}"]
        self.config = tmp_path / "osstream.toml"
        # Tests that write their own [nbd] table say PORT where this server's port goes.
        config_extra = config_extra.replace("PORT", str(self.port))
        listen_toml = ", ".join(f'"{a}"' for a in self.listen)
        self.config.write_text(
            f'data_dir = "{self.data_dir}"\n'
            f"{config_extra}\n"
            + ("" if "[nbd]" in config_extra else f"[nbd]\nlisten = [{listen_toml}]\n")
            + ("" if demo or "[demo]" in config_extra else "[demo]\ncreate = false\n")
        )
        self.log = tmp_path / "server.log"
        self.proc = None
        # A command `serve` runs under (`ip netns exec NS` for a server in a namespace).
        self.wrap = []
        # Admin commands never create a catalog; tests set up vdisks before the first
        # start as an admin would, after `osstream init`.
        # A configuration that is wrong on purpose fails here and again, checked, at start.
        subprocess.run([BINARY, "--config", str(self.config), "init"], capture_output=True, timeout=60)

    def uri(self, export=""):
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def cli(self, *args):
        """Runs an admin command on this server's configuration; returns its output."""
        return subprocess.run([BINARY, "--config", str(self.config), *args], check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()

    def start(self, wait=True, args=()):
        """`osstream serve` with this server's configuration (and `args`, such as
        `--listen`)."""
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen([*self.wrap, BINARY, "--config", str(self.config), "serve", *args],
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log.read_text()}")
            if "osstream ready" in self.log.read_text():
                return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        if self.proc:
            self.log_file.close()
        return self.proc.returncode if self.proc else None

    def alive(self):
        return self.proc.poll() is None


@pytest.fixture
def server(tmp_path):
    """The embedded default (demo vdisk) on a free port."""
    s = Server(tmp_path).start()
    yield s
    s.stop()


@pytest.fixture
def make_server(tmp_path):
    """A factory for servers with extra configuration; all are stopped afterwards."""
    started = []

    def make(config_extra="", start=True, **kw):
        sub = tmp_path / f"s{len(started)}"
        sub.mkdir()
        s = Server(sub, config_extra, **kw)
        started.append(s)
        return s.start() if start else s

    yield make
    for s in started:
        s.stop()


BUCKET = "vdisks"


def s3rver_binary():
    path = os.environ.get("TEST_S3RVER") or shutil.which("s3rver")
    assert path, ("s3rver not found: run scripts/test.sh (it installs it), or `npm install s3rver@3` "
                  "and set TEST_S3RVER=/path/to/node_modules/.bin/s3rver")
    return path


def wait_port(port, what, timeout=20):
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not listen on {port}")
            time.sleep(0.05)


@pytest.fixture
def s3(tmp_path):
    """An s3rver with the bucket `vdisks`; yields its port."""
    port = free_port()
    (tmp_path / "s3").mkdir()
    proc = subprocess.Popen([s3rver_binary(), "-d", str(tmp_path / "s3"), "-a", "127.0.0.1", "-p", str(port),
                             "-s", "--configure-bucket", BUCKET], stdout=subprocess.DEVNULL)
    try:
        wait_port(port, "s3rver")
        yield port
    finally:
        proc.kill()
        proc.wait()


def backend_toml(name, port, extra="", keys=True, host="127.0.0.1"):
    keys = 'access_key_id = "S3RVER"\nsecret_access_key = "S3RVER"\n' if keys else ""
    return (f'[backends.{name}]\nkind = "s3"\nbucket = "{BUCKET}"\nprefix = "lab"\n'
            f'endpoint = "http://{host}:{port}"\nregion = "us-east-1"\n{keys}allow_http = true\n{extra}\n')


def start_postgres(tmp_path, host="127.0.0.1", clients=None):
    """A throwaway PostgreSQL cluster on loopback, and on `host` too (an address of this
    host) for the network `clients` (CIDR); returns (url with `host`, stop)."""
    import glob
    import socket
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    assert bins, "PostgreSQL is not installed (scripts/test.sh installs it)"
    bin_dir = bins[-1]
    import pathlib
    import shutil
    import tempfile
    # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
    root = pathlib.Path(tempfile.mkdtemp(prefix="osstream-pg-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        subprocess.run(["chown", "postgres:postgres", str(root)], check=True)
    data = root / "data"
    subprocess.run(prefix + [f"{bin_dir}/initdb", "-D", str(data), "-A", "trust", "-U", "osstream", "--no-sync"],
                   check=True, capture_output=True)
    listen = "127.0.0.1" if host == "127.0.0.1" else f"127.0.0.1,{host}"
    if clients:
        with open(data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {clients} trust\n")
    subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                             f"-p {port} -k {root} -c listen_addresses={listen} -c fsync=off", "start"],
                   check=True, capture_output=True)

    def stop():
        subprocess.run(prefix + [f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    return f"postgres://osstream@{host}:{port}/postgres", stop


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL cluster on loopback; yields its URL."""
    url, stop = start_postgres(tmp_path)
    try:
        yield url
    finally:
        stop()


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(root, addresses=("127.0.0.1",)):
    """A CA, a server certificate for localhost and `addresses` and a client certificate, laid
    out as libnbd and qemu read a `tls-certificates`/`dir` folder (ca-cert.pem,
    client-cert.pem, client-key.pem), plus a second CA nobody trusts."""
    root.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{ca}-key.pem", "-out", f"{ca}-cert.pem", "-days", "2",
                "-subj", f"/CN=osstream test {ca}", cwd=root)
    (root / "server.ext").write_text("subjectAltName=DNS:localhost," + ",".join(f"IP:{a}" for a in addresses)
                                  + "\nextendedKeyUsage=serverAuth\n")
    (root / "client.ext").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    for who, ca, ext in (("server", "ca", "server.ext"), ("client", "ca", "client.ext"),
                         ("rogue", "other-ca", "client.ext")):
        openssl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=root)
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
                "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile", ext, cwd=root)
    return root
