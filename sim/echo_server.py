"""A tiny test server that tells the client who it saw: the workload every e2e test talks to.

Run inside a pod netns as a script (`python3 sim/echo_server.py --mode http --port 8080`); it needs
nothing but the standard library, so any interpreter can run it.

* `--mode http` answers every request (any method, any path) with `200` and a JSON body::

      {"peer": "10.7.3.2", "peer_port": 51234, "local": "10.7.3.3", "port": 8080,
       "path": "/x?y=1", "method": "GET", "name": "b", "headers": {...}, "body_len": 0}

  `peer` is the client address exactly as the kernel reported it to `accept()` (an IPv4-mapped
  IPv6 address is shown as plain IPv4), so a test can tell whether a proxy preserved the source
  address; `local`/`port` are the address and port the connection arrived on.  Keep-alive
  (HTTP/1.1 with Content-Length) works, so `wrk` can drive it.
* `--mode tcp` echoes every byte back until the client closes.

Everything that reaches the server is recorded on stdout, one JSON line each (`{"seen": "request",
"peer", "method", "path"}` or `{"seen": "connection", "peer"}`), so a test can prove what did
and did not get through (`sim.node.Pod.seen`).

Both modes listen on `[::]` with IPV6_V6ONLY off, i.e. on IPv4 and IPv6 at once.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _plain(address: str) -> str:
    """`::ffff:10.1.2.3` -> `10.1.2.3`; anything else unchanged."""
    return address.removeprefix("::ffff:") if address.startswith("::ffff:") else address


def _record(event: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _DualStack:
    """Mixin for socketserver servers: bind `[::]` with IPV6_V6ONLY off."""

    socket: socket.socket

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()  # type: ignore[misc]


class EchoHTTPServer(_DualStack, ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    name = ""


class EchoTCPServer(_DualStack, socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True


class _HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EchoHTTPServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body_len = len(self.rfile.read(length)) if length > 0 else 0
        local = self.connection.getsockname()
        report = {
            "peer": _plain(self.client_address[0]),
            "peer_port": self.client_address[1],
            "local": _plain(local[0]),
            "port": local[1],
            "path": self.path,
            "method": self.command,
            "name": self.server.name,
            "headers": dict(self.headers.items()),
            "body_len": body_len,
        }
        _record({"seen": "request", "peer": report["peer"], "method": self.command,
                 "path": self.path})  # fmt: skip
        payload = (json.dumps(report) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:
        """Silence per-request logging: it would only cost time under load."""


class _TCPEchoHandler(socketserver.BaseRequestHandler):
    request: socket.socket

    def handle(self) -> None:
        _record({"seen": "connection", "peer": _plain(self.client_address[0])})
        while data := self.request.recv(65536):
            self.request.sendall(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["http", "tcp"], default="http")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="", help="reported as `name` in HTTP answers")
    args = parser.parse_args(argv)
    server: socketserver.TCPServer
    if args.mode == "http":
        http = EchoHTTPServer(("::", args.port), _HTTPHandler)
        http.name = args.name
        server = http
    else:
        server = EchoTCPServer(("::", args.port), _TCPEchoHandler)
    print(f"listening {args.mode} on [::]:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
