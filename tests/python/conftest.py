"""Fixtures that start and stop real osstream servers on loopback for the tests."""

import hashlib
import os
import signal
import socket
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BINARY = os.environ.get("TEST_OSSTREAM_BIN", os.path.join(TARGET, "debug", "osstream"))


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

    def uri(self, export=""):
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def start(self, wait=True):
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen([BINARY, "--config", str(self.config), "serve"],
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
