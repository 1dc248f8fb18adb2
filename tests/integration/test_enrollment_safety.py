"""Enrollment safety with a real `agent run` (root, real namespaces, real iptables).

Each test builds a throwaway node: a network namespace `ferry-s<run>-<random>` in which the agent
runs (its state dir and config in the test's temporary directory), and pod namespaces
`<node>-<name>`.  The agent's own namespace is therefore the throwaway node, never the machine's:
a test that tries to enroll "the node's own namespace" (by its name, `/proc/self/ns/net` as the
agent resolves it, `/proc/<agent pid>/ns/net`, or a declared workload) could at worst redirect
that throwaway namespace, and each test checks that nothing of Ferry's landed there or in the
host's tables.  (PID 1's namespace is the machine's own: it is refused by the same pure check,
tested in tests/unit, and never handed to a real agent.)  No proxy runs: these are the agent's
decisions, and an enrollment succeeds with zero proxies.

The CLI runs as an operator runs it, `python -m agent ...` from the host namespace, unless a test
runs it inside the node to make "the namespace it runs in" the node's.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.admin import request
from agent.workloads import STORE_NAME

RUN = secrets.token_hex(2)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {result.stderr}{result.stdout}")
    return result


def ferry_rules(netns: str | None) -> list[str]:
    """Ferry's lines in a namespace's IPv4 and IPv6 tables (None: the host's)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    lines = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        lines += [line for line in run(*prefix, tool).stdout.splitlines() if "FERRY" in line]
    return lines


class Node:
    def __init__(self, workdir: Path) -> None:
        self.netns = f"ferry-s{RUN}-{secrets.token_hex(3)}"
        self.state_dir = workdir / "state"
        self.config = workdir / "ferry.yaml"
        self.log = workdir / "agent.log"
        self.pods: list[str] = []
        self.agent: subprocess.Popen[bytes] | None = None
        self.cleanups: list[list[str]] = []
        run("ip", "netns", "add", self.netns)
        run("ip", "-n", self.netns, "link", "set", "lo", "up")
        self.configure()

    def configure(self, **settings: Any) -> None:
        settings.setdefault("agent", {"reconcile_interval": 3600})
        self.config.write_text(yaml.safe_dump({"node_name": "safety", **settings}))

    def pod(self, name: str) -> str:
        netns = f"{self.netns}-{name}"
        run("ip", "netns", "add", netns)
        self.pods.append(netns)
        run("ip", "-n", netns, "link", "set", "lo", "up")
        return netns

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.agent = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    *self.argv("run", "--config", str(self.config)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait(lambda: (self.state_dir / "agent.sock").exists(), "agent.sock")

    def stop(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(10)

    def wait(self, ready: Any, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.log.read_text()[-3000:]}")

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agent", *args, "--state-dir", str(self.state_dir)]

    def cli(self, *args: str, inside: bool = False) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self.netns] if inside else []
        return run(*prefix, *self.argv(*args), check=False)

    def enroll(
        self, netns: str, sa: str = "web", inside: bool = False
    ) -> subprocess.CompletedProcess[str]:
        args = ("enroll", netns, "--namespace", "shop", "--service-account", sa)
        return self.cli(*args, inside=inside)

    def store(self) -> str:
        path = self.state_dir / STORE_NAME
        return path.read_text() if path.exists() else ""

    def enrolled(self) -> list[str]:
        raw = self.store()
        return sorted(w["name"] for w in json.loads(raw)["workloads"]) if raw else []

    def teardown(self) -> None:
        errors = []
        try:
            self.stop()
        except Exception as exc:
            errors.append(f"stopping the agent: {exc}")
            if self.agent is not None:
                self.agent.kill()
        for argv in reversed(self.cleanups):
            result = run(*argv, check=False)
            if result.returncode != 0:
                errors.append(f"{' '.join(argv)}: {result.stderr.strip()}")
        for netns in [*reversed(self.pods), self.netns]:
            result = run("ip", "netns", "del", netns, check=False)
            if result.returncode != 0:
                errors.append(f"ip netns del {netns}: {result.stderr.strip()}")
        assert not errors, errors


@pytest.fixture
def node(privileged: None, tmp_path: Path) -> Iterator[Node]:
    host_before = ferry_rules(None)
    made = Node(tmp_path)
    try:
        yield made
    finally:
        made.teardown()
    assert ferry_rules(None) == host_before


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_the_agents_own_namespace_is_refused_by_every_path(node: Node) -> None:
    node.start()
    assert node.agent is not None  # `ip netns exec` execs the agent: the same pid
    for path in (node.netns, "/proc/self/ns/net", f"/proc/{node.agent.pid}/ns/net"):
        error = one_line_error(node.enroll(path))
        assert "refusing to enroll network namespace" in error, error
        assert "the network namespace the agent itself runs in" in error, error
    body = {"op": "enroll", "netns": node.netns, "namespace": "shop", "service_account": "x"}
    reply = request(node.state_dir / "agent.sock", body)  # the admin socket itself
    assert reply["ok"] is False and "refusing to enroll" in reply["error"]
    assert ferry_rules(node.netns) == []
    assert node.enrolled() == []


def test_a_declared_workload_naming_the_node_is_refused(node: Node) -> None:
    pod = node.pod("app")
    node.configure(
        agent={"reconcile_interval": 0.2},
        workloads=[
            {"netns": node.netns, "namespace": "shop", "service_account": "node"},
            {"netns": pod, "namespace": "shop", "service_account": "app"},
        ],
    )
    node.start()
    node.wait(lambda: "refusing to enroll" in node.log.read_text(), "the declared refusal")
    node.wait(lambda: node.enrolled() == [pod], "the other declared workload")
    assert ferry_rules(node.netns) == []
    assert ferry_rules(pod) != []


def test_offline_enrollment_of_the_namespace_the_cli_runs_in_is_refused(node: Node) -> None:
    error = one_line_error(node.enroll(node.netns, inside=True))
    assert "refusing to enroll" in error and "runs in" in error
    error = one_line_error(node.enroll("/proc/self/ns/net"))  # the host's, as the CLI sees it
    assert "refusing to enroll" in error
    assert node.store() == ""


def test_one_namespace_is_enrolled_once_whatever_path_names_it(node: Node) -> None:
    pod = node.pod("app")
    sleeper = subprocess.Popen(["ip", "netns", "exec", pod, "sleep", "60"])
    alias = f"{pod}-alias"
    try:
        node.wait(lambda: run("ip", "netns", "pids", pod).stdout.strip() != "", "a process")
        pid = run("ip", "netns", "pids", pod).stdout.split()[0]
        run("ip", "netns", "attach", alias, pid)
        node.cleanups.append(["ip", "netns", "del", alias])
        node.start()
        assert node.enroll(pod).returncode == 0
        rules = ferry_rules(pod)
        for other in (f"/proc/{pid}/ns/net", alias):
            error = one_line_error(node.enroll(other, sa="other"))
            assert f"is already enrolled as shop/web (as {pod!r}" in error, error
            assert "uid netns-" in error
        assert node.enrolled() == [pod]
        assert ferry_rules(pod) == rules
        assert node.cli("unenroll", f"/proc/{pid}/ns/net").returncode == 0
        assert ferry_rules(pod) == [] and node.enrolled() == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_gone_namespace_is_unenrolled_by_its_name(node: Node) -> None:
    pod = node.pod("app")
    node.start()
    assert node.enroll(pod).returncode == 0
    run("ip", "netns", "del", pod)
    node.pods.remove(pod)
    result = node.cli("unenroll", pod)
    assert result.returncode == 0, result.stderr
    assert node.enrolled() == []


def test_offline_unenroll_uses_the_configured_table_and_marks(node: Node) -> None:
    pod = node.pod("app")
    node.configure(redirection={"route_table": 123, "connmark": 0x222})
    node.start()
    assert node.enroll(pod).returncode == 0
    assert "lookup 123" in run("ip", "-n", pod, "rule").stdout
    node.stop()
    result = node.cli("unenroll", pod, "--config", str(node.config))
    assert result.returncode == 0, result.stderr
    assert "the agent is not running" in result.stdout
    assert "lookup 123" not in run("ip", "-n", pod, "rule").stdout
    assert run("ip", "-n", pod, "route", "show", "table", "123").stdout == ""
    assert ferry_rules(pod) == []
    assert node.enrolled() == []


def test_a_failing_store_is_an_answer_and_the_cli_never_writes_behind_the_agent(
    node: Node,
) -> None:
    pod = node.pod("app")
    node.start()
    assert node.enroll(pod, sa="first").returncode == 0
    assert node.cli("unenroll", pod).returncode == 0
    before = node.store()
    (node.state_dir / "enrollments.tmp").mkdir()  # every save of the store now fails
    node.cleanups.append(["rmdir", str(node.state_dir / "enrollments.tmp")])
    error = one_line_error(node.enroll(pod))
    assert "failed at persist: cannot save enrollments to" in error, error
    assert "rolled back" in error
    assert node.store() == before
    assert ferry_rules(pod) == []
    assert node.agent is not None and node.agent.poll() is None  # still running
    (node.state_dir / "enrollments.tmp").rmdir()
    node.cleanups.clear()
    assert node.enroll(pod).returncode == 0
    assert node.enrolled() == [pod]


def test_an_agent_that_holds_the_lock_but_does_not_answer_is_never_bypassed(node: Node) -> None:
    pod = node.pod("app")
    node.start()
    (node.state_dir / "agent.sock").unlink()  # the agent runs, but cannot be asked
    error = one_line_error(node.enroll(pod))
    assert "the agent (pid" in error and "is running but did not answer" in error, error
    error = one_line_error(node.cli("unenroll", pod))
    assert "is running but did not answer" in error
    assert node.enrolled() == []
    assert ferry_rules(pod) == []


def test_a_second_agent_on_the_same_state_dir_refuses_to_start(node: Node) -> None:
    node.start()
    second = node.cli("run", "--config", str(node.config), inside=True)
    assert second.returncode != 0
    assert "another agent (pid" in second.stderr and "one agent per state dir" in second.stderr
