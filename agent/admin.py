"""Local admin sockets: one JSON request, one JSON response, over a unix stream socket.

`agent run` serves `<state-dir>/agent.sock` (enroll, unenroll, status, reconcile) and
`agent proxy` serves `<state-dir>/proxy.sock` (status).  Both sockets are created 0600 inside a
0700 state dir: only root on the node can talk to them.  A request is one line of JSON; the reply
is one line of JSON with `"ok": true` or `"ok": false, "error": "..."`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import socketserver
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

AGENT_SOCKET = "agent.sock"
PROXY_SOCKET = "proxy.sock"
MAX_REQUEST = 1 << 20

Reply = dict[str, Any]


class AdminUnavailable(ConnectionError):
    """Nothing is listening on the admin socket (the process is not running)."""


def prepare_state_dir(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)


def _unlink_stale(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def request(path: Path, body: dict[str, Any], timeout: float = 30.0) -> Reply:
    """Send one request; raise `AdminUnavailable` when no server answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AdminUnavailable(f"nothing is listening on {path}") from exc
        sock.sendall(json.dumps(body).encode() + b"\n")
        with sock.makefile("rb") as stream:
            line = stream.readline(MAX_REQUEST)
    finally:
        sock.close()
    if not line:
        raise AdminUnavailable(f"{path} closed the connection without answering")
    reply: Reply = json.loads(line)
    return reply


def _error(exc: BaseException) -> Reply:
    return {"ok": False, "error": str(exc)}


async def serve_async(
    path: Path, handler: Callable[[dict[str, Any]], Awaitable[Reply]]
) -> asyncio.AbstractServer:
    """Serve requests on the running asyncio loop (the agent)."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                body = json.loads(line)
                if not isinstance(body, dict):
                    raise ValueError(f"request must be a JSON object, got {line[:80]!r}")
                reply = await handler(body)
            except ValueError as exc:
                reply = _error(exc)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    _unlink_stale(path)
    server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST)
    os.chmod(path, 0o600)
    return server


class _ThreadedServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve_thread(path: Path, handler: Callable[[dict[str, Any]], Reply]) -> _ThreadedServer:
    """Serve requests from a background thread (the proxy supervisor)."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline(MAX_REQUEST)
            try:
                body = json.loads(line)
                if not isinstance(body, dict):
                    raise ValueError(f"request must be a JSON object, got {line[:80]!r}")
                reply = handler(body)
            except ValueError as exc:
                reply = _error(exc)
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    _unlink_stale(path)
    server = _ThreadedServer(str(path), Handler)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, name="admin", daemon=True).start()
    return server
