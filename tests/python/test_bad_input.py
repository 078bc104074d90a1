"""Bad input over raw sockets: the right error or a logged close, never a crash, and
every other client keeps being served."""

import signal
import socket
import struct
import subprocess
import time

import pytest

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_server(sock, timeout=5.0):
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def greet(port, flags=3):
    s = socket.create_connection(("127.0.0.1", port))
    assert recv_exact(s, 18) == b"NBDMAGICIHAVEOPT\x00\x03"
    s.sendall(struct.pack(">I", flags))
    return s


def send_option(s, option, data):
    s.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def read_replies(s):
    """Option replies up to and including the final one (ACK or an error)."""
    replies = []
    while True:
        magic, option, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == REPLY_MAGIC
        replies.append((kind, recv_exact(s, length)))
        if kind == 1 or kind & 0x80000000:
            return replies


def go(s, export=b"demo"):
    send_option(s, 7, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
    replies = read_replies(s)
    assert replies[-1][0] == 1, replies
    return replies


def request(s, command, offset, length, cookie=1, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length) + payload)


def simple_reply(s):
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC
    return error, cookie


def demo_bytes(server, offset, length):
    with open(server.images / "demo.img", "rb") as f:
        f.seek(offset)
        return f.read(length)


def still_serving(server):
    out = subprocess.run(["nbdinfo", "--size", server.uri("demo")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert server.alive()


@pytest.fixture
def quick_server(make_server):
    return make_server('[nbd]\nlisten = ["127.0.0.1:PORT"]\nhandshake_timeout = "1s"\n', start=False)


def start(s):
    return s.start()


def test_garbage_instead_of_client_flags(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    recv_exact(s, 18)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_server(s)
    still_serving(server)
    assert "lack FIXED_NEWSTYLE" in server.log.read_text()


def test_bad_option_magic_closes_with_a_log_line(server):
    s = greet(server.port)
    s.sendall(b"\x00" * 16)
    assert closed_by_server(s)
    still_serving(server)
    assert "bad option header" in server.log.read_text()


def test_oversized_option_is_closed_without_reading_it(server):
    s = greet(server.port)
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 64 * 1024 * 1024))
    assert closed_by_server(s)
    still_serving(server)
    assert "exceeds the 65536-byte limit" in server.log.read_text()


def test_stalled_handshake_is_closed_and_others_are_served(quick_server):
    server = start(quick_server)
    stalled = [greet(server.port) for _ in range(3)]
    silent = socket.create_connection(("127.0.0.1", server.port))  # never even sends flags
    still_serving(server)
    start_time = time.time()
    for s in stalled + [silent]:
        assert closed_by_server(s, timeout=10)
    assert time.time() - start_time < 9
    assert "handshake timed out" in server.log.read_text()
    still_serving(server)


def test_unknown_and_malformed_options_get_errors_then_go_works(server):
    s = greet(server.port)
    send_option(s, 99, b"whatever")
    assert read_replies(s)[-1][0] == 0x80000001  # ERR_UNSUP
    send_option(s, 7, struct.pack(">I", 500) + b"demo")  # name length overruns the data
    kind, message = read_replies(s)[-1]
    assert kind == 0x80000003 and b"malformed" in message  # ERR_INVALID
    send_option(s, 10, struct.pack(">I", 4) + b"demo" + struct.pack(">I", 0))  # meta before structured
    assert read_replies(s)[-1][0] == 0x80000003
    go(s)
    request(s, 0, 0, 512)
    assert simple_reply(s) == (0, 1)
    assert recv_exact(s, 512) == demo_bytes(server, 0, 512)


def test_bad_requests_get_errors_and_the_connection_keeps_working(server):
    s = greet(server.port)
    go(s)
    size = 64 << 20
    cases = [
        (99, 0, 0, 0),          # unknown command
        (0, size - 10, 20, 0),  # read past the end
        (0, 2**64 - 512, 1024, 0),  # offset + length overflows
        (0, 0, 512, 0x80),      # unknown flag on READ
        (7, 0, 4096, 0),        # block status without base:allocation
        (4, 0, 4096, 0),        # trim on a read-only export
    ]
    for cookie, (command, offset, length, flags) in enumerate(cases, start=10):
        request(s, command, offset, length, cookie=cookie, flags=flags)
        error, got_cookie = simple_reply(s)
        assert got_cookie == cookie
        assert error in (1, 22), (command, error)
    # A write to a read-only export: payload consumed, EPERM, stream still in sync.
    request(s, 1, 0, 4096, cookie=50, payload=b"w" * 4096)
    assert simple_reply(s) == (1, 50)
    # A write larger than the maximum: payload skipped unbuffered, refused, still in sync.
    big = 33 * 1024 * 1024
    request(s, 1, 0, big, cookie=51, payload=b"\0" * big)
    error, cookie = simple_reply(s)
    assert cookie == 51 and error in (1, 22)
    request(s, 0, 4096, 4096, cookie=60)
    assert simple_reply(s) == (0, 60)
    assert recv_exact(s, 4096) == demo_bytes(server, 4096, 4096)
    request(s, 2, 0, 0)  # DISC
    assert closed_by_server(s)
    still_serving(server)


def test_bad_request_magic_closes_that_connection_only(server):
    s = greet(server.port)
    go(s)
    s.sendall(b"\xde\xad\xbe\xef" + b"\x00" * 24)
    assert closed_by_server(s)
    still_serving(server)


def test_requests_queued_at_shutdown_are_answered_not_dropped(server):
    """A pipelining client's requests that reach the server as it shuts down are each
    answered (served, or refused with NBD_ESHUTDOWN), never left for a closed socket."""
    s = greet(server.port)
    go(s)
    for cookie in range(32):
        request(s, 0, cookie * 4096, 4096, cookie=cookie)
    server.proc.send_signal(signal.SIGTERM)
    for cookie in range(32, 64):
        request(s, 0, cookie * 4096, 4096, cookie=cookie)
    answers = {}
    for _ in range(64):
        error, cookie = simple_reply(s)
        if error == 0:
            recv_exact(s, 4096)
        answers[cookie] = error
    assert sorted(answers) == list(range(64))
    assert set(answers.values()) <= {0, 108}, answers  # 108: ESHUTDOWN
    assert closed_by_server(s)
    assert server.stop(timeout=20) == 0


def test_shutdown_drains_and_exits_zero(server):
    s = greet(server.port)
    go(s)
    request(s, 0, 0, 1 << 20, cookie=7)
    assert simple_reply(s) == (0, 7)
    recv_exact(s, 1 << 20)
    assert server.stop(timeout=20) == 0
    assert closed_by_server(s)
    log = server.log.read_text()
    assert "finishing requests in flight" in log and "stopped" in log
    assert "cache statistics (blocks)" in log and "tier=ram" in log and "misses=16" in log  # 1 MiB read = 16 blocks of 64 KiB
