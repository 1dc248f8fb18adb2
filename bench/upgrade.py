"""Proxy upgrades under load: connections dropped (target 0), takeover and overlap time.

Two scenarios, each on throwaway simulated nodes (`sim.node.SimNode`, CNI pods) with a real
`agent run` and `agent proxy` per node:

- same node, plaintext: a client and a server pod on one node;
- cross node, mTLS: the client on node A, the server on node B (HBONE tunnel); the upgrades
  alternate between B (the tunnel's server end) and A (its client end).

The server pod runs nginx (`GET /1k.bin`) and an echo server.  The client pod runs `sim/load.py`:
`--concurrency` clients each making one request per new TCP connection for the whole scenario
(every request is a connect an upgrade could drop: a reset, a refusal, a 5 s stall or a short
response all count as dropped), and before each upgrade `--streams` long-lived echo connections,
which stay open through the upgrade and are closed by their client 1 s after the takeover.  Each
upgrade is `agent proxy --upgrade` (what `systemctl reload ferry-proxy` runs):

- takeover: from starting it until it returns (the new proxy serves; the old one drains); most
  of it is starting a Python process and its workers on a busy machine;
- handoff: from the listeners handed over to the old proxy no longer accepting (the new proxy's
  log): the agent's snapshot, adopting the listeners, the `serving` / `draining` exchange;
- overlap: from starting it until the old proxy has exited (its last connection ended);
- served during the overlap: requests that completed meanwhile (both proxies were serving).

The markdown table goes to stdout, progress to stderr, everything to `.bench-out/upgrade.json`.
Exit status 0 when every upgrade succeeded with no dropped connection, 1 otherwise, 130 when
interrupted.  Nodes, pods and processes are removed on exit, also on failure or Ctrl-C.

    sudo .venv/bin/python -m bench.upgrade [--upgrades 3] [--concurrency 8] [--streams 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from agent.config import ProxyConfig
from bench.common import OUT_DIR, log
from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes

LOAD = Path(__file__).resolve().parents[1] / "sim" / "load.py"
HTTP, ECHO = 80, 9000
HOLD = 1.0  # seconds the long-lived connections stay open after a takeover
DRAIN = ProxyConfig().drain_timeout  # the nodes run the default


@dataclass
class Upgrade:
    node: str
    ok: bool
    begun: float  # unix time the upgrade started
    takeover_s: float
    handoff_s: float
    overlap_s: float
    streams_ok: int
    streams: int
    served_during: int = 0
    error: str = ""


@dataclass
class Scenario:
    name: str
    upgrades: list[Upgrade] = field(default_factory=list)
    served: int = 0
    dropped: int = 0
    errors: list[Any] = field(default_factory=list)
    error: str = ""


def gone_at(pid: int, timeout: float) -> float:
    """When process `pid` ended (a zombie has), waiting at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.time()
        except psutil.NoSuchProcess:
            return time.time()
        time.sleep(0.05)
    raise RuntimeError(f"the old proxy (pid {pid}) still runs after {timeout:.0f} s")


def _load(client: Pod, server: Pod, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, str(LOAD), *args[:1], server.ip4, *args[1:]]
    return client.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _finish(load: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = load.communicate(input="", timeout=60)
    result: dict[str, Any] = json.loads(out)
    return result


def _upgrade(ferry: FerryNode, client: Pod, server: Pod, streams: int) -> Upgrade:
    """One upgrade of `ferry`'s proxy with `streams` long-lived connections open through it."""
    held = _load(client, server, "streams", str(ECHO), "--connections", str(streams))
    time.sleep(0.5)
    old = ferry.proxy_pid()
    begun = time.time()
    code = ferry.upgrade_proxy().wait(300)
    took_over = time.time()
    if code != 0:
        _finish(held)
        return Upgrade(ferry.node.name, False, begun, took_over - begun, 0.0, 0.0, 0, streams,
                       error=ferry.upgrade_output()[-500:])  # fmt: skip
    time.sleep(HOLD)
    survived = sum(1 for s in _finish(held)["streams"] if s["ok"] and s["ended"] > took_over)
    old_gone = gone_at(old, DRAIN + 30)
    return Upgrade(ferry.node.name, True, begun, took_over - begun, _handoff(ferry),
                   old_gone - begun, survived, streams)  # fmt: skip


def _handoff(ferry: FerryNode) -> float:
    """Seconds from the listeners handed over to the old proxy not accepting, as logged."""
    stamps = {}
    for line in ferry.upgrade_output().splitlines():
        for mark in ("inherited the listeners", "took over: the previous proxy"):
            if mark in line:
                stamps[mark] = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return stamps["took over: the previous proxy"] - stamps["inherited the listeners"]


class Bench:
    def __init__(self, opts: Any) -> None:
        self.opts = opts
        self.nodes: list[SimNode] = []
        self.scenarios: list[Scenario] = []

    def node(self, prefix: str) -> SimNode:
        node = SimNode(prefix)
        self.nodes.append(node)
        return node

    def run(self) -> None:
        for name, build in (("same node, plaintext", self.same_node),
                            ("cross node, mTLS", self.cross_node)):  # fmt: skip
            scenario = Scenario(name)
            self.scenarios.append(scenario)
            try:
                self.measure(scenario, *build())
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                scenario.error = f"{type(exc).__name__}: {exc}"
                log(f"{name}: failed: {scenario.error}")
            finally:
                self.teardown()

    def same_node(self) -> tuple[list[FerryNode], Pod, Pod]:
        log("same node: building the node, the client and server pods")
        node = self.node("up")
        server, client = node.add_pod("server"), node.add_pod("client")
        server.start_nginx(HTTP)
        server.start_tcp_echo_server(ECHO)
        ferry = FerryNode(node, workers=self.opts.workers)
        ferry.start()
        ferry.enroll(client, "bench", "client")
        ferry.enroll(server, "bench", "server")
        return [ferry], client, server

    def cross_node(self) -> tuple[list[FerryNode], Pod, Pod]:
        log("cross node: building two nodes, the link, a mesh, the client and server pods")
        node_a, node_b = self.node("ua"), self.node("ub")
        link_nodes(node_a, node_b)
        mesh = Mesh(Path(tempfile.mkdtemp(prefix="ferry-bench-mesh-", dir=node_a.tmpdir)))
        a, b = (mesh.add(node, workers=self.opts.workers) for node in (node_a, node_b))
        client, server = node_a.add_pod("client"), node_b.add_pod("server")
        server.start_nginx(HTTP)
        server.start_tcp_echo_server(ECHO)
        a.start()
        b.start()
        a.enroll(client, "bench", "client")
        b.enroll(server, "bench", "server")
        mesh.wait_directory(entries=4)
        return [b, a], client, server

    def measure(self, scenario: Scenario, ferries: list[FerryNode], client: Pod,
                server: Pod) -> None:  # fmt: skip
        load = _load(client, server, "requests", str(HTTP), "--concurrency",
                     str(self.opts.concurrency))  # fmt: skip
        try:
            time.sleep(2.0)
            for i in range(self.opts.upgrades):
                ferry = ferries[i % len(ferries)]
                log(f"{scenario.name}: upgrade {i + 1} of {ferry.node.name}'s proxy")
                upgrade = _upgrade(ferry, client, server, self.opts.streams)
                scenario.upgrades.append(upgrade)
                if not upgrade.ok:
                    log(f"{scenario.name}: upgrade {i + 1} failed: {upgrade.error}")
                time.sleep(1.0)
        finally:
            result = _finish(load)
        scenario.served, scenario.dropped = result["served"], result["failed"]
        scenario.errors = result["errors"]
        for u in scenario.upgrades:
            overlap = (u.begun, u.begun + u.overlap_s)
            u.served_during = sum(1 for t in result["ends"] if overlap[0] <= t <= overlap[1])

    def teardown(self) -> None:
        with ignoring_stop_signals():
            for node in reversed(self.nodes):
                try:
                    node.teardown()
                except Exception as exc:
                    log(f"teardown of {node.name}: {exc}")
            self.nodes.clear()

    @property
    def passed(self) -> bool:
        return bool(self.scenarios) and all(
            not s.error and s.dropped == 0 and s.upgrades
            and all(u.ok and u.streams_ok == u.streams for u in s.upgrades)
            for s in self.scenarios
        )  # fmt: skip


@contextlib.contextmanager
def ignoring_stop_signals() -> Iterator[None]:
    """Teardown is not interrupted by a second Ctrl-C or SIGTERM."""
    previous = [signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        yield
    finally:
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM), previous, strict=True):
            signal.signal(sig, handler)


def _median_max(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f} / {max(values):.2f}" if values else "-"


def report(bench: Bench) -> str:
    opts = bench.opts
    lines = [
        f"Proxy upgrades under load (`agent proxy --upgrade`): {opts.concurrency} clients, one "
        f"request per connection; {opts.streams} long-lived connections through each upgrade; "
        f"{opts.workers} worker(s)",
        "",
        "| scenario | upgrades | requests served | dropped | long-lived survived | "
        "takeover s | handoff s | overlap s | served during overlaps |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in bench.scenarios:
        ok = [u for u in s.upgrades if u.ok]
        survived = f"{sum(u.streams_ok for u in s.upgrades)}/{sum(u.streams for u in s.upgrades)}"
        lines.append(
            f"| {s.name} | {len(ok)}/{len(s.upgrades)} | {s.served} | {s.dropped} | {survived} | "
            f"{_median_max([u.takeover_s for u in ok])} | {_median_max([u.handoff_s for u in ok])} "
            f"| {_median_max([u.overlap_s for u in ok])} | {sum(u.served_during for u in ok)} |"
        )
    lines += ["", "Seconds as median / max over the upgrades."]
    for s in bench.scenarios:
        if s.error:
            lines.append(f"- {s.name}: FAILED: {s.error}")
        for upgrade in s.upgrades:
            if not upgrade.ok:
                lines.append(f"- {s.name}: upgrade of {upgrade.node} failed: {upgrade.error}")
        for when, why in s.errors[:5]:
            lines.append(f"- {s.name}: dropped at {when:.3f}: {why}")
    verdict = "PASS" if bench.passed else "FAIL"
    lines.append(f"{verdict}: every upgrade took over with 0 connections dropped and every "
                 "long-lived connection finished on the old proxy")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upgrades", type=int, default=3, help="per scenario (default 3)")
    parser.add_argument("--concurrency", type=int, default=8, help="request clients (default 8)")
    parser.add_argument("--streams", type=int, default=4, help="long-lived connections (4)")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (default 1)")
    opts = parser.parse_args(argv)
    if min(opts.upgrades, opts.concurrency, opts.streams, opts.workers) < 1:
        parser.error("every count must be at least 1")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    bench = Bench(opts)
    status = 0

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        bench.run()
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        bench.teardown()
    print(report(bench), flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    results = OUT_DIR / "upgrade.json"
    results.write_text(json.dumps({"schema": "ferry.bench.upgrade/v1", "options": vars(opts),
                                   "scenarios": [asdict(s) for s in bench.scenarios]},
                                  indent=2) + "\n")  # fmt: skip
    log(f"results written to {results}")
    return status or (0 if bench.passed else 1)


if __name__ == "__main__":
    sys.exit(main())
