#!/usr/bin/env python3
"""A tiny upstream for trying keygate behind Envoy: it answers every request with 200
and a JSON echo of what it received, so you can see the identity headers keygate added
and the credential headers it removed.

    python3 examples/upstream.py [--port 8080]
    curl -s -H 'authorization: Bearer sk_live_…' 127.0.0.1:10000/v1/contacts/1

The end-to-end tests import this module and use `serve()` as their upstream.

Response body:
    {"method": "GET", "path": "/v1/contacts/1",
     "headers": [["host", "127.0.0.1:10000"], ["x-tenant-id", "…"], …]}

`headers` is a list of [name, value] pairs in arrival order, names lower-cased, so a
header that arrives twice shows up twice.
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without this, Nagle's algorithm and the
    # peer's delayed ACK add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True

    def _echo(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[name.lower(), value] for name, value in self.headers.items()],
        }
        self.server.record(seen)
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


class EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, quiet=False):
        super().__init__(address, EchoHandler)
        self.quiet = quiet
        self._lock = threading.Lock()
        self._seen = []

    def record(self, request):
        with self._lock:
            self._seen.append(request)

    def requests(self):
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._seen)


def serve(host="127.0.0.1", port=0, quiet=True):
    """Start an echo server on a background thread; returns it (`.server_address`,
    `.requests()`, `.shutdown()`)."""
    server = EchoServer((host, port), quiet=quiet)
    threading.Thread(target=server.serve_forever, name="upstream", daemon=True).start()
    return server


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = EchoServer((args.host, args.port))
    print(f"upstream echo listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
