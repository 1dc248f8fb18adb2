"""Surviving the host: time to repair every pod's lost redirection, and what watching costs.

Per backend (iptables, nftables, eBPF) and per node size (1 and 20 enrolled pods), on a throwaway
simulated node (`sim.node.SimNode`, CNI pods) with a real `agent run` and `agent proxy` whose
reconcile loop runs once an hour (so only the loss watch, `agent.redirect.watch`, repairs):

- the loss, in every enrolled pod at once: iptables `-t nat -F` and `-t mangle -F` (IPv4 and
  IPv6); nftables `nft flush ruleset`; eBPF every pinned link detached (the pods' sk_lookup and
  the cgroup hooks, what `bpftool link detach` does); iptables and nftables also lose Ferry's
  route table 100;
- time to repair: per pod, from its loss (the moment its flush returned; for eBPF, the links
  detached) to the agent's log line of its repair, the quickest and the slowest pod of each of
  `--rounds` rounds; then `agent status` must read every pod back as `ok`;
- the agent's CPU per pod repaired (its CPU over the round, less its idle rate), and the
  machine's load average meanwhile: the repairs run one after another on the agent's netns
  thread, so a round of 20 takes 20 times the CPU of one, stretched by whatever else runs;
- the watch's cost: the agent's CPU over `--idle` seconds with nothing lost (its other loops
  are idle: the identity loop looks once a second), and the price of one sample measured in
  this process with the watch's own `Sentinel` on the same pods (microseconds of CPU per pod
  per sample; the watch samples every pod twice a second).

The markdown table goes to stdout, progress to stderr, everything to `.bench-out/repair.json`.
Exit status 0 when every repair took under 2 s, 1 otherwise, 130 when interrupted.  Nodes, pods,
processes and pinned eBPF objects are removed on exit, also on failure or Ctrl-C.

    sudo .venv/bin/python -m bench.repair [--rounds 3] [--pods 1,20] [--backends ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from agent.netns import NetnsExecutor
from agent.redirect import bpf_syscall as bpf
from agent.redirect import ebpf
from agent.redirect.ebpf_object import load_or_compile
from agent.redirect.watch import INTERVAL, Sentinel
from bench.common import OUT_DIR, log
from sim.ferry import FerryNode, HostMountsFerry
from sim.node import Pod, SimNode

TARGET = 2.0  # seconds
BACKENDS = ("iptables", "nftables", "ebpf")


@dataclass
class Case:
    backend: str
    pods: int
    repairs_s: list[float] = field(default_factory=list)  # the slowest pod, per round
    first_s: list[float] = field(default_factory=list)  # the quickest pod, per round
    agent_cpu_pct: float = 0.0  # idle, watch running
    sample_us: float = 0.0  # CPU per pod per sample
    repair_cpu_ms: list[float] = field(default_factory=list)  # the agent's, per pod, per round
    load: list[float] = field(default_factory=list)  # the machine's 1-minute load, per round
    error: str = ""

    @property
    def watch_pct(self) -> float:
        """The watch's share of one core: pods x samples per second x the cost of one."""
        return self.pods * (1 / INTERVAL) * self.sample_us / 1e4

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.repairs_s) and max(self.repairs_s) < TARGET


def lose(backend: str, ferry: FerryNode, pods: Sequence[Pod]) -> dict[str, float]:
    """Everything lost in every pod (see the module doc); when each pod had lost it (unix time,
    by pod name: its workload's name)."""
    if backend == "ebpf":
        for path in sorted((ebpf.pin_root(ferry.state_dir) / "links").glob("*")):
            fd = bpf.obj_get(path)
            try:
                bpf.link_detach(fd, path.name)
            finally:
                os.close(fd)
        return dict.fromkeys((pod.netns for pod in pods), time.time())
    if backend == "nftables":
        rules = ["nft flush ruleset"]
    else:
        rules = [f"{tool} -t {table} -F" for tool in ("iptables-legacy", "ip6tables-legacy")
                 for table in ("nat", "mangle")]  # fmt: skip
    routes = [f"ip {family} route flush table 100" for family in ("-4", "-6")]
    lost = {}
    for pod in pods:
        pod.exec(["sh", "-ec", "; ".join(rules + routes)], check=True)
        lost[pod.netns] = time.time()
    return lost


_REPAIRED = re.compile(r"^(\S+ \S+) ferry\.agent WARNING loss watch: repaired [^/ ]+/(\S+) ")


def repairs(ferry: FerryNode, skip: int) -> dict[str, list[float]]:
    """The repairs the agent logged after its first `skip` lines: their times, by workload."""
    found: dict[str, list[float]] = {}
    lines = (ferry.logs / "run.log").read_text(errors="replace").splitlines()[skip:]
    for match in filter(None, map(_REPAIRED.match, lines)):
        at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found.setdefault(match[2], []).append(at)
    return found


def log_lines(ferry: FerryNode) -> int:
    return len((ferry.logs / "run.log").read_text(errors="replace").splitlines())


def watch_counts(ferry: FerryNode) -> dict[str, Any]:
    counts: dict[str, Any] = ferry.status()["agent"]["loss_watch"]
    return counts


def sample_cost(backend: str, pods: Sequence[Pod], samples: int = 200) -> float:
    """CPU microseconds of one sample of one pod, with the watch's own Sentinel."""
    executor = NetnsExecutor()
    sentinels = [
        executor.call(p.netns_path, partial(Sentinel, backend, (4, 6), Path(p.netns_path)))
        for p in pods
    ]
    try:
        start = time.process_time()
        for _ in range(samples):
            for sentinel in sentinels:
                sentinel.sample(())
        return (time.process_time() - start) / (samples * len(sentinels)) * 1e6
    finally:
        for sentinel in sentinels:
            sentinel.close()
        executor.shutdown()


def measure(case: Case, rounds: int, idle: float) -> None:
    node = SimNode("rp")
    ferry: FerryNode | None = None
    try:
        log(f"{case.backend}, {case.pods} pod(s): building the node and its pods")
        pods = [node.add_pod(f"p{i}") for i in range(case.pods)]
        config = {"redirection": {"backend": case.backend}, "agent": {"reconcile_interval": 3600}}
        ferry = (HostMountsFerry if case.backend == "ebpf" else FerryNode)(node, config=config)
        ferry.start()
        for pod in pods:
            ferry.enroll(pod)
        deadline = time.monotonic() + 30
        while watch_counts(ferry)["applied"] < case.pods and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ferry.agent is not None
        agent = psutil.Process(ferry.agent.pid)
        before = agent.cpu_times()
        time.sleep(idle)
        after = agent.cpu_times()
        busy = (after.user - before.user) + (after.system - before.system)
        case.agent_cpu_pct = busy / idle * 100
        case.sample_us = sample_cost(case.backend, pods)
        for i in range(rounds):
            skip = log_lines(ferry)
            cpu = agent.cpu_times()
            lost = lose(case.backend, ferry, pods)

            def whole(lost: dict[str, float] = lost, skip: int = skip) -> bool:
                seen = repairs(ferry, skip)
                return all(any(t >= at for t in seen.get(n, ())) for n, at in lost.items())

            deadline = time.monotonic() + 20
            while not whole() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # a pod repaired twice (rules, then routes): its last repair counts
            spent = sum(agent.cpu_times()[:2]) - sum(cpu[:2]) - 1.0 * case.agent_cpu_pct / 100
            case.repair_cpu_ms.append(max(0.0, spent) / case.pods * 1e3)
            case.load.append(os.getloadavg()[0])
            seen = repairs(ferry, skip)
            took = [max([t for t in seen.get(n, ()) if t >= at], default=at + 99) - at
                    for n, at in lost.items()]  # fmt: skip
            case.first_s.append(min(took))
            case.repairs_s.append(max(took))
            states = {w["name"]: w["redirection"] for w in ferry.status()["workloads"]}
            if any(state != "ok" for state in states.values()):
                raise RuntimeError(f"round {i + 1}: not repaired: {states}")
            log(f"{case.backend}, {case.pods} pod(s): round {i + 1}: every pod repaired within "
                f"{max(took):.2f} s of its loss")  # fmt: skip
            time.sleep(1.0)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        case.error = f"{type(exc).__name__}: {exc}"
        log(f"{case.backend}, {case.pods} pod(s): failed: {case.error}")
    finally:
        if ferry is not None:
            ferry.stop(ferry.agent)
            ferry.stop(ferry.proxy)
            ebpf.cleanup(ferry.state_dir)
        node.teardown()


def report(cases: Sequence[Case]) -> str:
    lines = [
        "# Repair of lost redirection (the loss watch)",
        "",
        f"Every enrolled pod loses its rules and routes at once; the watch samples every "
        f"{INTERVAL:g} s. Target: every pod repaired within {TARGET:g} s. Repair CPU: the "
        "agent's CPU per pod repaired; load: the machine's 1-minute load average meanwhile "
        f"({os.cpu_count()} CPUs): the repairs of a round run one after another, so their "
        "wall time grows with both.",
        "",
        "| backend | pods | quickest pod (s) | slowest pod, median (s) | slowest pod, max (s) "
        "| repair CPU (ms/pod) | load | agent CPU idle | sample (µs/pod) | watch CPU | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in cases:
        if not c.repairs_s:
            lines.append(f"| {c.backend} | {c.pods} | | | | | | | | | FAILED: {c.error} |")
            continue
        verdict = "ok" if c.ok else f"FAILED {c.error}".strip()
        lines.append(
            f"| {c.backend} | {c.pods} | {statistics.median(c.first_s):.2f} "
            f"| {statistics.median(c.repairs_s):.2f} | {max(c.repairs_s):.2f} "
            f"| {statistics.median(c.repair_cpu_ms):.0f} | {statistics.median(c.load):.1f} "
            f"| {c.agent_cpu_pct:.1f} % | {c.sample_us:.0f} | {c.watch_pct:.2f} % | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="losses per case (default 3)")
    parser.add_argument("--pods", default="1,20", help="enrolled pods per case (default 1,20)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="default: all three")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of CPU measurement")
    opts = parser.parse_args(argv)
    sizes = [int(n) for n in opts.pods.split(",")]
    backends = opts.backends.split(",")
    if unknown := sorted(set(backends) - set(BACKENDS)):
        parser.error(f"unknown backend {', '.join(unknown)}; the backends: {', '.join(BACKENDS)}")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables, eBPF)", file=sys.stderr)
        return 2
    os.environ.setdefault(ebpf.CACHE_ENV, str(OUT_DIR / "bpf-cache"))
    if "ebpf" in backends:  # compiled once, before an agent waits for it
        load_or_compile(Path(os.environ[ebpf.CACHE_ENV]))
    cases = [Case(backend, pods) for backend in backends for pods in sizes]

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    status = 0
    try:
        for case in cases:
            measure(case, opts.rounds, opts.idle)
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report(cases), flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    document = {
        "schema": "ferry.bench.repair/v1",
        "options": vars(opts),
        "cases": [asdict(c) | {"watch_pct": c.watch_pct, "ok": c.ok} for c in cases],
    }
    (OUT_DIR / "repair.json").write_text(json.dumps(document, indent=2) + "\n")
    return status or (0 if all(c.ok for c in cases) else 1)


if __name__ == "__main__":
    sys.exit(main())
