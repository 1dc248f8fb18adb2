"""A real `agent proxy` (supervisor and two workers) driven over control.sock by a scripted agent.

The test plays the agent's side of the protocol with the production codec (`agent.control`): it
listens on `<state-dir>/control.sock` in a temporary state dir, takes the proxy's hello and sends
messages one by one, reading each ack.  That shows what the proxy acks and what every worker
really applied (the proxy's status, `agent status`'s source): a worker's failure comes back in
the ack, a directory travels in chunks, a bad entry is skipped and reported without losing the
rest, an out-of-order change is refused, and a proxy whose snapshot fails backs off instead of
reconnecting in a tight loop.  No network namespace is involved and no traffic is sent.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.admin import PROXY_SOCKET, AdminUnavailable, request
from agent.control.channel import CONTROL_SOCKET, recv_message, send_message
from agent.control.protocol import Ack, DirectoryChunk, Hello, Message, SnapshotSent, TrustBundle
from agent.directory import DirectoryEntry, plan_update

from .netns_pair import REPO


def entry(i: int) -> DirectoryEntry:
    return DirectoryEntry(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                          f"spiffe://cluster.local/ns/ns-{i % 50}/sa/sa-{i}", "node-b")  # fmt: skip


class ScriptedAgent:
    """The agent's end of control.sock, played by the test."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(state_dir / CONTROL_SOCKET))
        self.listener.listen(4)
        self.listener.settimeout(15)
        self.conn: socket.socket | None = None

    def accept(self) -> Hello:
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        self.conn = conn
        hello, _fds = recv_message(conn)
        assert isinstance(hello, Hello)
        return hello

    def send(self, message: Message) -> str | None:
        """Send one message; the proxy's ack error (None: applied)."""
        assert self.conn is not None
        send_message(self.conn, message)
        ack, _fds = recv_message(self.conn)
        assert isinstance(ack, Ack)
        return ack.error

    def send_directory(
        self,
        version: int,
        base: int,
        entries: list[DirectoryEntry],
        removals: tuple[str, ...] = (),
        reset: bool = True,
    ) -> list[str | None]:
        chunks = plan_update(version, base, "passthrough", entries, removals, reset=reset)
        return [self.send(DirectoryChunk(chunk)) for chunk in chunks]  # fmt: skip

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[ScriptedAgent, subprocess.Popen[bytes], Path]]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    agent = ScriptedAgent(state)
    log = open(tmp_path / "proxy.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "proxy", "--state-dir", str(state), "--workers", "2",
         "--metrics-address", f"127.0.0.1:{_free_port()}"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield agent, process, tmp_path / "proxy.log"
    finally:
        agent.close()
        stop(process)
        log.close()


def status(state_dir: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(AdminUnavailable):
            return request(state_dir / PROXY_SOCKET, {"op": "status"})
        assert time.monotonic() < deadline, "the proxy never answered on proxy.sock"
        time.sleep(0.05)


def test_a_worker_failure_comes_back_in_the_ack(
    proxy: tuple[ScriptedAgent, subprocess.Popen[bytes], Path],
) -> None:
    agent, _process, _log = proxy
    agent.accept()
    error = agent.send(TrustBundle("cluster.local", "-----BEGIN CERTIFICATE-----\nnot one\n"))
    assert error is not None
    assert "worker 0: cannot load the trust bundle" in error
    assert "worker 1: cannot load the trust bundle" in error


def test_a_large_directory_travels_in_chunks_and_every_worker_applies_it(
    proxy: tuple[ScriptedAgent, subprocess.Popen[bytes], Path],
) -> None:
    agent, _process, _log = proxy
    agent.accept()
    entries = [entry(i) for i in range(20_000)]
    assert set(agent.send_directory(1, 0, entries)) == {None}
    assert agent.send(SnapshotSent()) is None
    # a one-entry change is a delta of one chunk, not the whole directory again
    assert agent.send_directory(2, 1, [entry(20_000)], (entry(0).ip,), reset=False) == [None]
    doc = status(agent.state_dir)
    assert doc["agent_connected"] is True
    assert doc["directory"] == {"version": 2, "entries": 20_000, "rejected": 0, "problems": []}
    applied = {a["worker"]: (a["directory_version"], a["directory_entries"])
               for a in doc["applied"]}  # fmt: skip
    assert applied == {0: (2, 20_000), 1: (2, 20_000)}


def test_a_bad_entry_is_skipped_and_reported_and_the_rest_applies(
    proxy: tuple[ScriptedAgent, subprocess.Popen[bytes], Path],
) -> None:
    agent, _process, _log = proxy
    agent.accept()
    bad = DirectoryEntry("10.0.0.300", "spiffe://cluster.local/ns/a/sa/b", "node-b")
    assert agent.send_directory(1, 0, [entry(1), bad, entry(2)]) == [None]
    doc = status(agent.state_dir)
    assert doc["directory"]["entries"] == 2 and doc["directory"]["rejected"] == 1
    assert "'10.0.0.300' is not an IP address" in doc["directory"]["problems"][0]
    assert all(a["directory_entries"] == 2 for a in doc["applied"])


def test_a_change_that_does_not_follow_the_proxy_version_is_refused(
    proxy: tuple[ScriptedAgent, subprocess.Popen[bytes], Path],
) -> None:
    agent, _process, _log = proxy
    agent.accept()
    assert agent.send_directory(1, 0, [entry(1)]) == [None]
    (error,) = agent.send_directory(3, 2, [entry(2)], reset=False)
    assert error is not None and "does not apply to version 1" in error
    assert agent.send_directory(3, 0, [entry(1), entry(2)]) == [None]  # a reset always applies
    assert all(a["directory_version"] == 3 for a in status(agent.state_dir)["applied"])


def test_a_proxy_whose_snapshot_fails_backs_off(
    proxy: tuple[ScriptedAgent, subprocess.Popen[bytes], Path],
) -> None:
    """An agent that drops the connection before the snapshot completes must not be hammered."""
    agent, _process, _log = proxy
    attempts = []
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        agent.accept()
        attempts.append(time.monotonic() - started)
        assert agent.conn is not None
        agent.conn.close()  # no snapshot: the session failed
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) <= 10, attempts  # 10 ms doubling: about 8 tries in 3 s, not hundreds
    assert gaps[-1] > 0.3, gaps
