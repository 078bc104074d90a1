"""An HTTP proxy in front of s3rver that breaks some requests (503 SlowDown, 500, 429, a
stall, a connection reset, a body cut short) and can delay every one (a bucket in a far
region). Used by the S3 tests and the benchmarks (benches/scripts/s3_faults.py,
boot_streaming.py); run alone it only delays:

    python3 faultproxy.py --upstream PORT --port PORT --delay-ms 50
"""

import http.client
import http.server
import socket
import struct
import threading
import time

FAULTS = ("503", "500", "429", "stall", "reset", "short")


def every_eleventh(n, command):
    """A fixed rotation of every fault, on GETs and HEADs after the first two requests."""
    if command in ("GET", "HEAD") and n > 2:
        return {3: "503", 5: "stall", 7: "500", 9: "short", 10: "429", 1: "reset"}.get(n % 11)
    return None


class FaultyProxy:
    """Relays requests to s3rver on `upstream`, breaking those `choose(n, command)` names a
    fault for (`n` counts requests from 1); a stall sleeps `stall` seconds, then closes."""

    def __init__(self, upstream, stall=0, choose=lambda n, command: None, delay=0.0, port=0):
        self.upstream = upstream
        self.stall = stall
        self.choose = choose
        self.delay = delay
        self.count = 0
        self.injected = {"503": 0, "500": 0, "429": 0, "stall": 0, "reset": 0, "short": 0}
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                fault = proxy.choose(n, self.command)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fault in ("503", "500", "429"):
                    proxy.injected[fault] += 1
                    code = {"503": b"SlowDown", "500": b"InternalError", "429": b"TooManyRequests"}[fault]
                    payload = b"<?xml version=\"1.0\"?><Error><Code>" + code + b"</Code></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "reset":
                    proxy.injected["reset"] += 1
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "stall":
                    proxy.injected["stall"] += 1
                    time.sleep(proxy.stall)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    conn.putheader(key, value)
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but the object's Content-Length.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                if fault == "short" and self.command == "GET" and len(data) > 1:
                    proxy.injected["short"] += 1
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="An HTTP proxy that delays every request.")
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    proxy = FaultyProxy(args.upstream, delay=args.delay_ms / 1000, port=args.port)
    print(f"delaying requests to {args.upstream} by {args.delay_ms} ms on {proxy.port}", flush=True)
    threading.Event().wait()
