"""The proxy upgrade handoff over `<state-dir>/handoff.sock`: the sockets around the core.

The order of the conversation and its messages are `agent.proxy.handoff` (no I/O); this module
moves them, with their descriptors, and keeps the time limits:

- `HandoffServer`: the running proxy's end.  It listens on handoff.sock (0600) from the moment the
  proxy serves, takes one successor at a time on its own thread and drives the supervisor
  through `Handing`: give up the agent link and list the listeners (`yield_agent_link`), take the
  link back when the successor gives up, dies or does not say `serving` within
  `proxy.handoff_timeout` (`resume_agent_link`: the rollback, nothing else changed), or stop
  accepting for good (`stop_accepting`) and answer `draining`.
- `PredecessorLink`: the new proxy's end.  `connect` finds out whether a proxy runs (no one
  listening: a normal start), `inherit` takes its listeners (each checked to be a listening TCP
  socket; a refusal, a malformed message or silence for `proxy.handoff_timeout` raises
  `HandoffFailed` and keeps nothing), `gone` notices a predecessor that gave up, `serving` says
  this proxy serves and waits for `draining`.
- `start_in_background`: `agent proxy --upgrade` (systemd's ExecReload).  It starts the new proxy
  detached (double fork: its own session, reparented at once to the service manager, which then
  supervises it as the unit's main process once told so) and waits for the one line the proxy
  writes on an inherited pipe: `ok ...` once it took over, or why not.
- `notify_systemd`: `sd_notify(3)` without libsystemd (READY=1, MAINPID=), a no-op without
  `$NOTIFY_SOCKET`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.proxy.handoff import (
    HANDOFF_SOCKET,
    MAX_DATAGRAM,
    MAX_FDS,
    Draining,
    Handoff,
    HandoffError,
    Listeners,
    ListenersSent,
    Message,
    Refused,
    Serving,
    Takeover,
    refusal,
)
from agent.proxy.messages import ListenerSpec
from agent.proxy.sockets import Listener

log = logging.getLogger("ferry.proxy")
GREETING_TIMEOUT = 5.0  # seconds a successor has to say `takeover` once connected


class HandoffFailed(RuntimeError):
    """The takeover did not happen; the running proxy (if any) keeps serving."""


@dataclass
class Inherited:
    """A workload's netns and listeners as the predecessor handed them over."""

    netns_fd: int
    listeners: list[Listener]

    def serves(self, netns_fd: int) -> bool:
        """The same network namespace as `netns_fd` (the agent's, for this workload)?"""
        mine, theirs = os.fstat(self.netns_fd), os.fstat(netns_fd)
        return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)

    def close(self, keep: list[Listener] | None = None) -> None:
        """Close the netns fd and every listener not in `keep` (those now serve the workload)."""
        for listener in self.listeners:
            if not any(listener is kept for kept in keep or ()):
                listener.sock.close()
        os.close(self.netns_fd)


class Handing(Protocol):
    """What the running proxy's supervisor does for a takeover."""

    def yield_agent_link(self) -> list[tuple[str, int, list[Listener]]]: ...
    def resume_agent_link(self) -> None: ...
    def stop_accepting(self) -> int: ...


def _receive(sock: socket.socket, handoff: Handoff) -> tuple[Message, list[int]]:
    """One datagram with its descriptors, checked by the core (raises HandoffError, OSError and
    TimeoutError; closes the descriptors of a refused datagram)."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_DATAGRAM, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    try:
        return handoff.receive(data, len(fds)), fds
    except HandoffError:
        for fd in fds:
            os.close(fd)
        raise


class HandoffServer:
    """handoff.sock of the running proxy; one takeover at a time, on a thread."""

    def __init__(self, state_dir: Path, host: Handing, handoff_timeout: float,
                 drain_timeout: float) -> None:  # fmt: skip
        self.host = host
        self.handoff_timeout = handoff_timeout
        self.drain_timeout = drain_timeout
        path = state_dir / HANDOFF_SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a crashed proxy's; a live one answered the successor before this
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        os.chmod(path, 0o600)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, name="handoff", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop taking successors (the path stays: it may be a successor's already)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                if self._hand_over(conn):
                    return

    def _hand_over(self, conn: socket.socket) -> bool:
        """One successor: True once it took over (this proxy drains now)."""
        handoff = Handoff("predecessor")
        conn.settimeout(GREETING_TIMEOUT)
        try:
            takeover, _ = _receive(conn, handoff)
            assert isinstance(takeover, Takeover)  # the core accepts nothing else first
            why = refusal(takeover)
            if why is not None:
                conn.sendall(handoff.send(Refused(why)))
                log.error("refused a takeover by pid %d: %s", takeover.pid, why)
                return False
        except (HandoffError, OSError) as exc:
            log.warning("a would-be successor on %s: %s", HANDOFF_SOCKET, exc)
            return False
        handed = self.host.yield_agent_link()
        log.info("proxy pid %d (version %s) takes over: handing over the listeners of %d "
                 "workload(s)", takeover.pid, takeover.proxy_version, len(handed))  # fmt: skip
        try:
            conn.settimeout(self.handoff_timeout)
            for uid, netns_fd, listeners in handed:
                specs = tuple(ListenerSpec(lst.direction, lst.family) for lst in listeners)
                fds = [netns_fd, *(lst.sock.fileno() for lst in listeners)]
                socket.send_fds(conn, [handoff.send(Listeners(uid, specs))], fds)
            conn.sendall(handoff.send(ListenersSent(len(handed))))
            _receive(conn, handoff)  # `serving`: the only message the core takes now
        except (HandoffError, OSError) as exc:
            log.warning("takeover by pid %d failed (%s): this proxy serves on", takeover.pid,
                        exc or type(exc).__name__)  # fmt: skip
            self.host.resume_agent_link()
            return False
        connections = self.host.stop_accepting()
        with contextlib.suppress(OSError):
            conn.sendall(handoff.send(Draining(connections, self.drain_timeout)))
        log.info("proxy pid %d took over; draining %d open connection(s), at most %.0f s",
                 takeover.pid, connections, self.drain_timeout)  # fmt: skip
        return True


class PredecessorLink:
    """The new proxy's connection to the proxy it takes over from."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.handoff = Handoff("successor")

    @classmethod
    def connect(cls, state_dir: Path) -> PredecessorLink | None:
        """The running proxy's handoff socket, or None when no proxy runs."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(state_dir / HANDOFF_SOCKET))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        return cls(sock)

    def inherit(self, pid: int, version: str, timeout: float) -> dict[str, Inherited]:
        """Ask for the running proxy's listeners (it stops taking agent messages); by uid."""
        inherited: dict[str, Inherited] = {}
        deadline = time.monotonic() + timeout
        try:
            self.sock.sendall(self.handoff.send(Takeover(pid, version)))
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                message, fds = _receive(self.sock, self.handoff)
                match message:
                    case Listeners(uid=uid, listeners=specs):
                        inherited[uid] = _inherited(specs, fds)
                    case ListenersSent():
                        return inherited
                    case Refused(reason=reason):
                        raise HandoffFailed(f"the running proxy refused: {reason}")
        except TimeoutError:
            _close_all(inherited)
            raise HandoffFailed(f"the running proxy did not hand its listeners over in "
                                f"{timeout:.0f} s (proxy.handoff_timeout)") from None  # fmt: skip
        except (HandoffError, OSError) as exc:
            _close_all(inherited)
            raise HandoffFailed(f"handing the listeners over failed: {exc}") from None
        except BaseException:
            _close_all(inherited)
            raise

    def gone(self) -> bool:
        """The predecessor closed the handoff (it gave up: it serves on)."""
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(0))  # it sends nothing until `draining`: readable means closed

    def serving(self, pid: int, timeout: float) -> Draining:
        """Say this proxy serves; the predecessor answers once it stopped accepting."""
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(self.handoff.send(Serving(pid)))
            message, _ = _receive(self.sock, self.handoff)
        except (HandoffError, OSError) as exc:  # closed: it gave up just before
            raise HandoffFailed(f"the running proxy did not confirm: {exc}") from None
        assert isinstance(message, Draining)  # the only message the core takes now
        return message

    def close(self) -> None:
        self.sock.close()


def _inherited(specs: tuple[ListenerSpec, ...], fds: list[int]) -> Inherited:
    socks = [socket.socket(fileno=fd) for fd in fds[1:]]
    for sock in socks:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            os.close(fds[0])
            for other in socks:
                other.close()
            raise HandoffError(f"fd {sock.fileno()} handed over is not a listening TCP socket")
    pairs = zip(specs, socks, strict=True)
    return Inherited(fds[0], [Listener(spec.direction, spec.family, sock) for spec, sock in pairs])


def _close_all(inherited: dict[str, Inherited]) -> None:
    for held in inherited.values():
        held.close()


def notify_systemd(*fields: str) -> None:
    """sd_notify(3): e.g. "READY=1", "MAINPID=42"; nothing when not run by systemd."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError as exc:
            log.warning("cannot notify systemd on %s: %s", path, exc)


def report(fd: int | None, line: str) -> None:
    """Tell `agent proxy --upgrade` how the takeover went (one line), once."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, line.encode()[:4000] + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def start_in_background(argv: list[str], timeout: float) -> str:
    """Start `argv + ["--report-fd", N]` detached and wait for its report; return the `ok` line
    or raise HandoffFailed with the reason it gave (or with its silence)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the intermediate: start the proxy in its own session, then leave at once
        status = 1
        try:
            os.close(read)
            os.setsid()
            subprocess.Popen([*argv, "--report-fd", str(write)], pass_fds=[write],
                             stdin=subprocess.DEVNULL)  # fmt: skip
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    os.waitpid(child, 0)
    text = b""
    deadline = time.monotonic() + timeout
    with open(read, "rb", buffering=0) as pipe:
        poll = select.poll()
        poll.register(pipe, select.POLLIN)
        while time.monotonic() < deadline:
            if not poll.poll(max(deadline - time.monotonic(), 0) * 1000):
                continue
            chunk = pipe.read(4096)
            if not chunk:
                break
            text += chunk
    line = text.decode(errors="replace").strip()
    if line.startswith("ok"):
        return line
    if not line and time.monotonic() >= deadline:
        line = f"the new proxy did not report in {timeout:.0f} s (see its log)"
    reason = line.removeprefix("failed: ")
    raise HandoffFailed(reason or "the new proxy exited before it took over (see its log)")
