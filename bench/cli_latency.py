"""Wall time of the everyday CLI commands (`agent status`, `agent enroll`, `agent unenroll`).

An operator types these and a CNI plugin runs the same paths on every pod start, so each must
answer quickly (target: p50 <= 200 ms) with the agent and the proxy running.

The bench builds a throwaway node: a network namespace `ferry-b-<random>` holding a real
`agent run` and `agent proxy --workers 1` (their state dir and config in a temporary directory),
and `--pods` pod namespaces `ferry-b-<random>-p<i>` enrolled with `agent enroll`, plus one more
that is enrolled and unenrolled over and over.  Each command then runs `--runs` times as a fresh
process (`python -m agent ...`, from the host's network namespace, as an operator would) and the
table gives p50 / p99 / max wall milliseconds per command.  Everything (processes, namespaces,
temporary files) is removed on exit, also on failure or Ctrl-C.

    sudo .venv/bin/python -m bench.cli_latency [--runs 30] [--pods 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from agent.admin import AdminUnavailable, request

TARGET_MS = 200.0


class BenchError(RuntimeError):
    """The throwaway node could not be built or a command failed."""


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


def _ip(*args: str) -> None:
    result = _run(["ip", *args])
    if result.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {result.stderr.strip()}")


class Node:
    """An agent and a proxy in their own netns, with enrolled throwaway pod namespaces."""

    def __init__(
        self, workdir: Path, pods: int, config: dict[str, Any] | None = None, workers: int = 1
    ) -> None:
        self.tag = secrets.token_hex(3)
        self.settings = {"node_name": f"bench-{self.tag}", **(config or {})}
        self.workers = workers
        self.netns = f"ferry-b-{self.tag}"
        self.pods = [f"{self.netns}-p{i}" for i in range(pods)]
        self.spare = f"{self.netns}-x"
        self.state_dir = workdir / "state"
        self.config = workdir / "ferry.yaml"
        self.logs = workdir / "logs"
        self.created: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def agent(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agent", *args, "--state-dir", str(self.state_dir)]

    def start(self) -> None:
        for name in [self.netns, *self.pods, self.spare]:
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        self.logs.mkdir()
        self.config.write_text(yaml.safe_dump(self.settings))
        for command, extra, ready in (
            ("run", (), self._agent_up),
            ("proxy", ("--workers", str(self.workers)), self._connected),
        ):
            with open(self.logs / f"{command}.log", "wb") as log:
                self.processes.append(
                    subprocess.Popen(
                        [
                            "ip",
                            "netns",
                            "exec",
                            self.netns,
                            *self.agent(command, "--config", str(self.config), *extra),
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            self._wait(ready, command)
        for pod in self.pods:
            self.cli("enroll", pod, "--namespace", "bench", "--service-account", "idle")

    def _agent_up(self) -> bool:
        return (self.state_dir / "agent.sock").exists()

    def _connected(self) -> bool:
        try:
            reply = request(self.state_dir / "proxy.sock", {"op": "status"}, timeout=2)
        except (AdminUnavailable, OSError, ValueError):
            return False
        return bool(reply.get("agent_connected"))

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if ready():
                return
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.05)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.logs.glob("*.log")))
        raise BenchError(f"{what} did not come up\n{logs}")

    def cli(self, *args: str, ok: Sequence[int] = (0,)) -> None:
        result = _run(self.agent(*args))
        if result.returncode not in ok:
            raise BenchError(f"agent {' '.join(args)}: {result.stderr.strip()}{result.stdout}")

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        errors = []
        for name in reversed(self.created):
            result = _run(["ip", "netns", "del", name])
            if result.returncode != 0:
                errors.append(f"{name}: {result.stderr.strip()}")
        if errors:
            raise BenchError("could not delete namespaces: " + "; ".join(errors))


@contextlib.contextmanager
def throwaway_node(
    pods: int, config: dict[str, Any] | None = None, workers: int = 1
) -> Iterator[Node]:
    """A started `Node` (`config`: extra settings for its YAML), always stopped and removed."""
    workdir = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    node = Node(workdir, pods, config, workers)
    try:
        node.start()
        yield node
    finally:
        try:
            node.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def measure(node: Node, runs: int) -> dict[str, list[float]]:
    """Wall milliseconds of each command, `runs` times; enroll and unenroll alternate."""
    config = ("--config", str(node.config))
    samples: dict[str, list[float]] = {"status": [], "enroll": [], "unenroll": []}
    enroll = ("enroll", node.spare, "--namespace", "bench", "--service-account", "spare")
    for _ in range(runs):
        samples["status"].append(timed(lambda: node.cli("status", *config, ok=(0, 1))))
        samples["enroll"].append(timed(lambda: node.cli(*enroll)))
        samples["unenroll"].append(timed(lambda: node.cli("unenroll", node.spare)))
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(samples: dict[str, list[float]], pods: int) -> str:
    lines = [
        f"agent CLI wall time, agent + proxy running, {pods} enrolled pod(s) "
        f"(target p50 <= {TARGET_MS:.0f} ms)",
        "",
        "| command  | runs | p50 ms | p99 ms | max ms | mean ms |",
        "|----------|-----:|-------:|-------:|-------:|--------:|",
    ]
    for command, values in samples.items():
        lines.append(
            f"| {command:<8} | {len(values):>4} | {percentile(values, 0.5):>6.0f} | "
            f"{percentile(values, 0.99):>6.0f} | {max(values):>6.0f} | "
            f"{statistics.fmean(values):>7.0f} |"
        )
    verdict = all(percentile(v, 0.5) <= TARGET_MS for v in samples.values())
    lines += ["", f"{'PASS' if verdict else 'FAIL'}: p50 of every command <= {TARGET_MS:.0f} ms"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30, help="runs per command (default 30)")
    parser.add_argument("--pods", type=int, default=3, help="enrolled idle pods (default 3)")
    args: Any = parser.parse_args(argv)
    if args.runs < 1 or args.pods < 0:
        parser.error("--runs must be at least 1 and --pods at least 0")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    try:
        with throwaway_node(args.pods) as node:
            samples = measure(node, args.runs)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(report(samples, args.pods))
    return 0 if all(percentile(v, 0.5) <= TARGET_MS for v in samples.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
