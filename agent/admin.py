"""Local admin sockets: one JSON request, one JSON response, over a unix stream socket.

`agent run` serves `<state-dir>/agent.sock` (enroll, unenroll, status, reconcile) and
`agent proxy` serves `<state-dir>/proxy.sock` (status).  Both sockets are created 0600 inside a
0700 state dir: only root on the node can talk to them.  A request is one line of JSON; the reply
is one line of JSON with `"ok": true` or `"ok": false, "error": "..."`.  Every request is
answered: a handler that fails unexpectedly is logged with its traceback and answered with the
error, never by closing the socket (which a client would take for "nobody is running").

Whether an agent runs on a state dir is known from `<state-dir>/agent.lock`, not from the socket:
the agent holds an exclusive flock on it for its whole life (`hold_agent_lock`), and a command
that changes state behind the agent's back (recording an enrollment while it is down) first takes
that lock without waiting (`agent_stopped`) and refuses when it cannot.

The client side (`request`) imports only the standard library's socket and json, so the CLI
stays quick; the servers load asyncio or socketserver when they start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio
    import socketserver

AGENT_SOCKET = "agent.sock"
PROXY_SOCKET = "proxy.sock"
AGENT_LOCK = "agent.lock"
MAX_REQUEST = 1 << 20

Reply = dict[str, Any]


class AdminUnavailable(ConnectionError):
    """Nothing is listening on the admin socket (the process is not running)."""


class AgentRunning(RuntimeError):
    """An agent holds the state dir's lock, so its state must not be changed behind its back."""


def _open_lock(state_dir: Path) -> int:
    return os.open(state_dir / AGENT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(os.pread(fd, 32, 0))})"
    return ""


def hold_agent_lock(state_dir: Path, wait: float = 5.0) -> int:
    """Take `<state-dir>/agent.lock` for the agent's whole life: the returned fd holds it.

    Waits up to `wait` seconds (a CLI may hold it for a moment while recording an enrollment);
    raises `AgentRunning` when another agent keeps it."""
    fd = _open_lock(state_dir)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise AgentRunning(
                    f"another agent{holder} runs on {state_dir} ({state_dir / AGENT_LOCK} is "
                    "locked): one agent per state dir"
                ) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


@contextlib.contextmanager
def agent_stopped(state_dir: Path, why: str) -> Iterator[None]:
    """Hold the agent lock for an offline change; `AgentRunning` if an agent holds it.

    `why` says what went wrong with asking the agent (it goes into the refusal)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = _open_lock(state_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentRunning(
                f"the agent{_holder(fd)} is running but did not answer: {why}"
            ) from None
        yield
    finally:
        os.close(fd)


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


def _failure(exc: Exception) -> Reply:
    import logging  # servers only: the CLI's client side stays small

    logging.getLogger("ferry.admin").error("admin request failed", exc_info=exc)
    return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}


async def serve_async(
    path: Path, handler: Callable[[dict[str, Any]], Awaitable[Reply]]
) -> asyncio.AbstractServer:
    """Serve requests on the running asyncio loop (the agent)."""
    import asyncio

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
            except Exception as exc:
                reply = _failure(exc)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    _unlink_stale(path)
    server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST)
    os.chmod(path, 0o600)
    return server


def serve_thread(
    path: Path, handler: Callable[[dict[str, Any]], Reply]
) -> socketserver.UnixStreamServer:
    """Serve requests from a background thread (the proxy supervisor)."""
    import socketserver
    import threading

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

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
            except Exception as exc:
                reply = _failure(exc)
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    _unlink_stale(path)
    server = Server(str(path), Handler)
    os.chmod(path, 0o600)
    threading.Thread(target=server.serve_forever, name="admin", daemon=True).start()
    return server
