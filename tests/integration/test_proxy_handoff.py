"""Proxy upgrades with nothing to drain: a chain of real `agent proxy` takeovers on one state dir.

A replaced proxy with no connection open drains at once.  It must still tell its successor
`draining` before it exits: a successor that sees the handoff closed after `serving` rolls back,
and then no proxy serves at all (found by the churn soak, `bench/soak.py`).  The agent's side
is the scripted one of `test_proxy_control` (each proxy gets an empty snapshot); no network
namespace is involved and no traffic is sent.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from agent.control.protocol import SnapshotSent

from .netns_pair import REPO
from .test_proxy_control import ScriptedAgent, _free_port, status, stop

GENERATIONS = 3


def _serving(state_dir: Path, pid: int) -> bool:
    """Wait until the proxy answering on proxy.sock is `pid` (the one it replaces may answer, or
    close a connection, meanwhile)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(ConnectionError):
            if status(state_dir).get("pid") == pid:
                return True
        time.sleep(0.05)
    return False


def test_each_replaced_proxy_leaves_its_successor_serving(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    agent = ScriptedAgent(state)
    metrics = f"127.0.0.1:{_free_port()}"
    proxies: list[subprocess.Popen[bytes]] = []
    try:
        for generation in range(GENERATIONS):
            log = tmp_path / f"proxy-{generation}.log"
            with log.open("wb") as out:
                proxies.append(subprocess.Popen(
                    [sys.executable, "-m", "agent", "proxy", "--state-dir", str(state),
                     "--workers", "1", "--metrics-address", metrics],
                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            agent.accept()  # the new proxy's hello: its predecessor left the link
            assert agent.send(SnapshotSent()) is None
            new = proxies[-1]
            assert _serving(state, new.pid), log.read_text()
            if generation:
                assert proxies[-2].wait(20) == 0  # drained (nothing was open) and gone
            time.sleep(0.5)
            assert new.poll() is None, log.read_text()  # no rollback: it serves on
            assert status(state)["pid"] == new.pid
    finally:
        agent.close()
        for process in proxies:
            stop(process)
