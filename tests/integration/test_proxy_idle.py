"""A replaced proxy told not to exit (`proxy.exit_after_drain: false`, the DaemonSet's setting).

In a pod, a proxy that exits once drained is restarted by the kubelet, and the restarted one
would take the listeners back from its successor.  Here two real `agent proxy` processes share
a state dir: the first, replaced by the second, drains (nothing is open), then stays alive with
no worker and nothing bound until SIGTERM, when it exits 0; the successor serves throughout.
Each proxy's `proxy.ready_file` (its pod's readiness) exists exactly while it serves.  An idle
proxy whose successor died without one of its own (no proxy on the metrics port) exits 1, for
the kubelet to start it again.
The agent's side is the scripted one of `test_proxy_control`; no network namespace is involved.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.control.protocol import SnapshotSent

from .netns_pair import REPO
from .test_proxy_control import ScriptedAgent, _free_port, status, stop
from .test_proxy_handoff import _serving

NAMES = ["old", "new", "newest"]


def _children(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return [c for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def _wait_for(log: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return True
        time.sleep(0.05)
    return False


def _wait_for_file(path: Path) -> bool:
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def test_a_drained_proxy_stays_idle_until_sigterm_and_its_successor_serves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    metrics = f"127.0.0.1:{_free_port()}"
    agent = ScriptedAgent(state)
    proxies: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"{name}.log" for name in NAMES]
    ready = [tmp_path / f"{name}.ready" for name in NAMES]
    try:
        for log, ready_file in zip(logs[:2], ready[:2], strict=True):
            config = tmp_path / f"{log.stem}.yaml"
            config.write_text(f"proxy:\n  metrics_address: {metrics}\n  exit_after_drain: false\n"
                              f"  ready_file: {ready_file}\n")  # fmt: skip
            with log.open("wb") as out:
                proxies.append(subprocess.Popen(
                    [sys.executable, "-m", "agent", "proxy", "--state-dir", str(state),
                     "--workers", "1", "--config", str(config)],
                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            agent.accept()
            assert agent.send(SnapshotSent()) is None
            assert _serving(state, proxies[-1].pid), log.read_text()
            assert _wait_for_file(ready_file), log.read_text()
        old, new = proxies
        assert not ready[0].exists()  # replaced: its pod is no longer ready
        assert _wait_for(logs[0], "idle until SIGTERM", 20), logs[0].read_text()
        time.sleep(1.0)
        assert old.poll() is None, logs[0].read_text()  # drained, not exited
        assert _children(old.pid) == []  # no worker: it accepts nothing
        assert status(state)["pid"] == new.pid  # proxy.sock, the port: the successor's
        with urllib.request.urlopen(f"http://{metrics}/readyz", timeout=5) as answer:
            assert answer.status == 200
        old.send_signal(signal.SIGTERM)
        assert old.wait(10) == 0, logs[0].read_text()
        time.sleep(0.5)
        assert new.poll() is None, logs[1].read_text()
        assert ready[1].exists()
        assert status(state)["pid"] == new.pid
        with logs[2].open("wb") as out:
            newest = subprocess.Popen(
                [sys.executable, "-m", "agent", "proxy", "--state-dir", str(state),
                 "--workers", "1", "--config", str(tmp_path / "new.yaml"), "--metrics-address",
                 metrics],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        proxies.append(newest)
        agent.accept()
        assert agent.send(SnapshotSent()) is None
        assert _serving(state, newest.pid), logs[2].read_text()
        assert _wait_for(logs[1], "idle until SIGTERM", 20), logs[1].read_text()
        newest.kill()  # its workers die with it: no proxy serves, none restarts it here
        newest.wait(5)
        assert new.wait(15) == 1, logs[1].read_text()  # orphaned: exits, to be started again
    finally:
        agent.close()
        for process in proxies:
            stop(process)


def test_exit_after_drain_must_be_a_boolean() -> None:
    assert parse_config({}).proxy.exit_after_drain is True
    assert parse_config({"proxy": {"exit_after_drain": False}}).proxy.exit_after_drain is False
    with pytest.raises(ConfigError, match=r"proxy.exit_after_drain: 'no' must be true or false"):
        parse_config({"proxy": {"exit_after_drain": "no"}})
    with pytest.raises(ConfigError, match=r"proxy.ready_file: 'tmp/ready' must be an absolute"):
        parse_config({"proxy": {"ready_file": "tmp/ready"}})
