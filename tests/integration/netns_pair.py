"""What test_proxy_worker and test_tunnel share: two throwaway namespaces joined by a veth, the
real worker processes started for them, and the helpers that talk to those workers.

    side 0 netns (ips[0]/30, veth0)  <--veth-->  side 1 netns (ips[1]/30, veth0)

Namespaces are named `ferry-t<run>-<hex>-<side>` (`tests.run_id`). `NetnsPair.close()` stops every
process started through it and removes the namespaces it created, also when the setup itself fails
half-way (`closed_on_error`); the test modules' fixtures hold it in a `with`, so close() runs
whatever the test's outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import pytest

from agent.config import LimitsConfig, PolicyConfig, ProxyConfig, RedirectionConfig
from agent.control.protocol import policy_chunks
from agent.netns import NetnsExecutor, entered, open_netns
from agent.policy.compile import PolicySet
from agent.policy.documents import combine, parse_text
from agent.proxy.messages import (
    AddWorkload,
    Done,
    ListenerSpec,
    Mode,
    Stats,
    StatsRequest,
    ToWorker,
    UpdatePolicy,
    decode,
    encode,
)
from agent.proxy.ratelimit_store import SharedBuckets
from agent.proxy.sockets import open_listeners
from agent.redirect.iptables import IptablesRedirection
from tests.run_id import netns_name

REPO = Path(__file__).resolve().parents[2]
HTTP_PORT = 8080

needs_netns = pytest.mark.usefixtures("privileged")  # fails, never skips, without root

# Answers GET with the client's address, or /big/<n> with n bytes.
HTTP_SERVER = """
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = self.client_address[0].encode()
        if self.path.startswith("/big"):
            body = b"z" * int(self.path.split("/")[-1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


class NetnsPair:
    """The two namespaces, the fds that hold them, and the processes started in them."""

    def __init__(
        self,
        tmp: Path,
        sides: tuple[str, str],
        ips: tuple[str, str],
        redirection: RedirectionConfig,
        proxy: ProxyConfig,
    ) -> None:
        base = netns_name()
        self.names = (f"{base}-{sides[0]}", f"{base}-{sides[1]}")
        self.ips = ips
        self.tmp = tmp
        self.redirection = redirection
        self.proxy = proxy
        self.executor = NetnsExecutor()  # before the namespaces: close() shuts it down
        self.procs: list[subprocess.Popen[bytes]] = []
        self.controls: list[socket.socket] = []
        self.fds: list[int] = []
        self._created: list[str] = []
        with self.closed_on_error():
            for ns in self.names:
                sh("ip", "netns", "add", ns)
                self._created.append(ns)
            left, right = self.names
            sh("ip", "-n", left, "link", "add", "veth0", "type", "veth", "peer", "name",
               "veth0", "netns", right)  # fmt: skip
            for ns, ip in zip(self.names, ips, strict=True):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", "veth0")
                sh("ip", "-n", ns, "link", "set", "veth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            self.netns_fds = (self._fd(left), self._fd(right))

    @contextmanager
    def closed_on_error(self) -> Iterator[None]:
        """Undo everything (close()) if the block fails: for setup steps before the fixture."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fd(self, ns: str) -> int:
        fd = open_netns(f"/var/run/netns/{ns}")
        self.fds.append(fd)
        return fd

    def spawn(
        self, ns: str, *cmd: str, stderr: int = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL, stderr=stderr
        )
        self.procs.append(proc)
        return proc

    def http_server(self) -> None:
        """HTTP_SERVER on side 1's address, HTTP_PORT; returns once it accepts."""
        script = self.tmp / "server.py"
        script.write_text(HTTP_SERVER)
        self.spawn(self.names[1], sys.executable, str(script), self.ips[1], str(HTTP_PORT))
        wait_port(self.netns_fds[1], (self.ips[1], HTTP_PORT), self.redirection.mark)

    def start_worker(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        policy: PolicyConfig | None = None,
        limits: LimitsConfig | None = None,
        nofile: int = 0,
        log: Path | None = None,
    ) -> socket.socket:
        """A worker process with self.proxy, self.redirection, `policy` and `limits` (default:
        the default sections), at most `nofile` open files (0: ours), its output in `log`
        (default: ours); returns its control socket."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.controls.append(ours)
        settings = {"proxy": asdict(self.proxy), "redirection": asdict(self.redirection),
                    "policy": asdict(policy or PolicyConfig()),
                    "limits": asdict(limits or LimitsConfig())}  # fmt: skip
        buckets, buckets_fd = SharedBuckets.create(1024)  # as the supervisor shares them
        buckets.close()
        prefix = ["prlimit", f"--nofile={nofile}:{nofile}", "--"] if nofile else []
        output = open(log, "ab") if log is not None else None  # noqa: SIM115 - the child's
        try:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "agent.proxy.worker", "--control-fd",
                 str(theirs.fileno()), *args, "--config-json", json.dumps(settings),
                 "--buckets-fd", str(buckets_fd)],
                pass_fds=[theirs.fileno(), buckets_fd],
                cwd=REPO,
                env=env,
                stderr=output,
            )  # fmt: skip
        finally:
            theirs.close()
            os.close(buckets_fd)
            if output is not None:
                output.close()
        self.procs.append(proc)
        return ours

    def enroll(self, ns: str) -> None:
        """Redirect `ns`'s traffic to the proxy with the rules production installs."""
        IptablesRedirection(self.redirection, self.executor).apply(Path(f"/var/run/netns/{ns}"))

    def add_workload(
        self,
        ctl: socket.socket,
        uid: str,
        netns_fd: int,
        *,
        identity: str = "",
        mode: Mode = "permissive",
        ips: tuple[str, ...] = (),
        namespace: str = "",
        labels: dict[str, str] | None = None,
    ) -> None:
        """Give the worker behind `ctl` the listeners of the workload in `netns_fd`."""
        listeners = open_listeners(netns_fd, self.redirection)
        specs = tuple(ListenerSpec(x.direction, x.family) for x in listeners)
        try:
            fds = [netns_fd, *(x.sock.fileno() for x in listeners)]
            request(ctl, lambda seq: AddWorkload(seq, uid, identity, mode, ips, specs, namespace,
                                                 dict(labels or {})), fds)  # fmt: skip
        finally:
            for x in listeners:  # the worker holds its own copies now
                x.sock.close()

    def close(self) -> None:
        """Stop the processes, then remove the namespaces, even if stopping fails."""
        try:
            for ctl in self.controls:
                ctl.close()  # a worker exits on EOF
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        finally:
            try:
                for fd in self.fds:
                    os.close(fd)
            finally:
                self.executor.shutdown()
                for ns in self._created:
                    sh("ip", "netns", "del", ns, check=False)


def wait_port(netns_fd: int, addr: tuple[str, int], mark: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with entered(netns_fd):
            probe = socket.socket()
        try:
            probe.settimeout(1)
            # Marked so that the redirection rules (if any) let the probe through.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            probe.connect(addr)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        finally:
            probe.close()


def serve_digest(srv: socket.socket) -> tuple[threading.Thread, dict[str, Any]]:
    """Accept one connection on `srv` in a started thread: read to EOF, answer "<bytes> <sha256>".
    The dict gets the client's address ("peer") and the byte count ("n")."""
    result: dict[str, Any] = {}

    def serve() -> None:
        conn, peer = srv.accept()
        with conn:
            digest, n = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                n += len(chunk)
            result.update(peer=peer[0], n=n)
            conn.sendall(f"{n} {digest.hexdigest()}".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, result


_SEQ = iter(range(1, 1 << 62))


def request(
    ctl: socket.socket, make: Callable[[int], ToWorker], fds: list[int] | None = None
) -> Done:
    """Send one message as the supervisor does and wait for the worker's `Done` (stats that
    arrive meanwhile are skipped); fails the test if the worker refused it."""
    seq = next(_SEQ)
    data = encode(make(seq))
    if fds:
        socket.send_fds(ctl, [data], fds)
    else:
        ctl.send(data)
    ctl.settimeout(10)
    while True:
        reply = decode(ctl.recv(1 << 22))
        if isinstance(reply, Done) and reply.seq == seq:
            assert reply.error is None, reply.error
            return reply


def stats(ctl: socket.socket) -> Stats:
    """Ask for counters; return the newest stats message that arrives."""
    ctl.send(encode(StatsRequest()))
    ctl.settimeout(5)
    latest = None
    while latest is None:
        reply = decode(ctl.recv(1 << 22))
        if isinstance(reply, Stats):
            latest = reply
    ctl.settimeout(0.05)
    try:
        while True:
            reply = decode(ctl.recv(1 << 22))
            if isinstance(reply, Stats):
                latest = reply
    except TimeoutError:
        pass
    return latest


def wait_stats(ctl: socket.socket, pred: Callable[[Stats], bool], timeout: float = 5.0) -> Stats:
    deadline = time.monotonic() + timeout
    while True:
        s = stats(ctl)
        if pred(s):
            return s
        assert time.monotonic() < deadline, f"stats never matched: {s}"
        time.sleep(0.1)


def curl(ns: str, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "--max-time", "10", *extra, url],
        capture_output=True,
        text=True,
        timeout=30,
    )


def send_policy(ctl: socket.socket, version: int, documents: str) -> None:
    """Put the policy of these YAML documents in force in the worker behind `ctl`, as the
    supervisor forwards it: the PolicySet JSON in slices."""
    loaded = combine([(parsed, "test.yaml") for parsed in parse_text(documents, "test.yaml")])
    assert loaded.ok, loaded.errors
    text = json.dumps(PolicySet.of(loaded.documents).to_json())
    for part in policy_chunks(version, text):
        request(ctl, lambda seq, p=part: UpdatePolicy(seq, p.version, p.last, p.text))  # type: ignore[misc]
