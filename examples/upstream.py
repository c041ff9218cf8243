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

A WebSocket upgrade (`GET` with `Upgrade: websocket`) is accepted and echoes every text
or binary message back until the client closes; the upgrade request is recorded like any
other.
"""

import argparse
import base64
import hashlib
import json
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# RFC 6455: the GUID the accept key is derived with, and the opcodes used here.
WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


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
        if self.command == "GET" and (self.headers.get("upgrade") or "").lower() == "websocket":
            return self._websocket()
        body = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def _websocket(self):
        key = self.headers.get("sec-websocket-key") or ""
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode()).digest())
        self.send_response(101, "Switching Protocols")
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        while True:
            frame = self._read_frame()
            if frame is None:
                break
            opcode, payload = frame
            if opcode in (OP_TEXT, OP_BINARY):
                self._send_frame(opcode, payload)
            elif opcode == OP_PING:
                self._send_frame(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                self._send_frame(OP_CLOSE, payload[:2])
                break
        self.close_connection = True

    def _read_frame(self):
        """One whole client frame (masked, unfragmented), or None at end of stream."""
        head = self.rfile.read(2)
        if len(head) < 2:
            return None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self.rfile.read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self.rfile.read(8))
        mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
        data = self.rfile.read(length)
        if len(data) < length:
            return None
        return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))

    def _send_frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()

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
