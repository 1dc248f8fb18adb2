"""Churn soak: pod create/delete cycles under continuous traffic, with proxy upgrades.

One simulated node (`sim.node.SimNode`, CNI pods) with a real `agent run` and `agent proxy`
(`sim.ferry.FerryNode`).  Two steady pods, `client` and `server` (nginx and an echo server),
are enrolled for the whole run, and `client` runs `sim/load.py requests` against `server`
throughout: one HTTP request per new TCP connection, so every request is a redirected connect
that a leak, a stale rule or an upgrade could break.  Then `--cycles` times:

    CNI ADD a new pod -> enroll it (agent.sock, as `agent enroll` does) -> one request from it
    to `server` through the proxy (the new pod is really served) -> unenroll -> CNI DEL

and every `--upgrade-every` cycles `agent proxy --upgrade` (what `systemctl reload` runs)
replaces the proxy while the traffic goes on; the old proxy must have exited before the next
cycle.  At the start and every `--sample-every` cycles the bench pauses the steady traffic,
waits until the proxy holds no connection (only the two steady pods are enrolled then, so every
sample compares with the first) and samples:

- rules and routes: lines of `iptables-legacy-save`, `ip6tables-legacy-save` and
  `nft list ruleset` in the node netns and in each steady pod, and `ip rule` / `ip route show
  table all` there (a churned pod's own rules leave with its netns; what must not grow is
  what lives outside it);
- residue: network namespaces and veth links of this node, CNI IPAM leases, the workloads the
  agent, the proxy and the agent's enrollment store still hold;
- descriptors and threads of `agent run` and of the proxy (supervisor and workers), and BPF
  objects: pins under `<state-dir>/bpf` and the bpf-prog/map/link descriptors those processes
  hold (non-zero with `--backend ebpf` only, where they must stay constant);
- RSS of the agent and of the proxy (supervisor and workers), over time.

The proxy's pipes are counted apart from its other descriptors: each worker keeps up to 256
empty splice pipes for reuse (a bounded cache that follows the peak of concurrent relays, and
starts empty in an upgraded proxy).  The verdict: leaks (end minus
start, with the same two pods enrolled and nothing in flight) of every kind are zero,
and no request failed: neither the steady traffic nor a churned pod's request.  The markdown
report goes to stdout, progress to stderr, everything to `.bench-out/soak.json`.  Exit status 0
on PASS, 1 otherwise, 130 when interrupted; the node, its pods and every process are removed on
exit, also on failure or Ctrl-C.

    sudo .venv/bin/python -m bench.soak [--cycles 500] [--upgrade-every 100] [--sample-every 25]
        [--concurrency 4] [--workers 1] [--backend iptables]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil

from agent.admin import PROXY_SOCKET, request
from bench.common import MB, OUT_DIR, log
from bench.upgrade import gone_at, ignoring_stop_signals
from sim.ferry import FerryNode
from sim.node import Pod, SimNode

LOAD = Path(__file__).resolve().parents[1] / "sim" / "load.py"
HTTP, ECHO = 80, 9000
SETTLE = 10.0  # seconds a sample waits for the proxy's connections to end
UPGRADE_WAIT = 120.0  # seconds an upgrade and the old proxy's drain may take together
IPAM_BOOKKEEPING = {"lock", "last_reserved_ip.0", "last_reserved_ip.1"}  # host-local's own files
T = TypeVar("T")
BPF_KINDS = ("anon_inode:bpf-prog", "anon_inode:bpf-map", "anon_inode:bpf-link")


@dataclass
class Sample:
    """What the node holds after `cycle` cycles."""

    cycle: int
    at: float  # seconds since the soak began
    proxy_pid: int
    rules: dict[str, int]  # where -> lines of rules / routes
    residue: dict[str, int]  # what -> how many
    agent_fds: int
    proxy_fds: int  # pipes aside
    proxy_pipes: int  # kept in the workers' splice pipe pools (up to 256 each): a cache
    agent_threads: int
    proxy_threads: int
    bpf_pins: int
    bpf_fds: int
    agent_rss_mb: float
    proxy_rss_mb: float


@dataclass
class Upgrade:
    cycle: int
    ok: bool
    seconds: float  # from `agent proxy --upgrade` to the old proxy's exit
    error: str = ""


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    upgrades: list[Upgrade] = field(default_factory=list)
    cycles: int = 0
    churn_failed: list[tuple[int, str]] = field(default_factory=list)  # cycle, why
    served: int = 0
    failed: int = 0
    errors: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def leaks(self) -> dict[str, int]:
        """End minus start of everything that must not grow (both with the steady pods only),
        by kind: "rules", "residue", "fds", "threads", "bpf" then what, e.g. "fds agent"."""
        if len(self.samples) < 2:
            return {}
        first, last = self.samples[0], self.samples[-1]
        out = {f"rules {k}": last.rules.get(k, 0) - v for k, v in first.rules.items()}
        out |= {f"residue {k}": last.residue.get(k, 0) - v for k, v in first.residue.items()}
        out |= {
            "fds agent": last.agent_fds - first.agent_fds,
            "fds proxy": last.proxy_fds - first.proxy_fds,
            "threads agent": last.agent_threads - first.agent_threads,
            "threads proxy": last.proxy_threads - first.proxy_threads,
            "bpf pins": last.bpf_pins - first.bpf_pins,
            "bpf fds": last.bpf_fds - first.bpf_fds,
        }
        return out

    def leaked(self, kind: str) -> int:
        return sum(v for k, v in self.leaks().items() if k.split()[0] == kind)

    @property
    def passed(self) -> bool:
        return (
            not self.error
            and bool(self.leaks())
            and not any(self.leaks().values())
            and self.failed == 0
            and not self.churn_failed
            and all(u.ok for u in self.upgrades)
        )


def _lines(result: subprocess.CompletedProcess[str]) -> int:
    return sum(1 for line in result.stdout.splitlines() if line and not line.startswith("#"))


def _rules(where: SimNode | Pod) -> dict[str, int]:
    """Lines of rules and routes in one netns (comments and counters-only lines excluded)."""
    out = {}
    for name, argv in (("iptables", ["iptables-legacy-save"]),
                       ("ip6tables", ["ip6tables-legacy-save"]),
                       ("nft", ["nft", "list", "ruleset"]),
                       ("ip rule", ["ip", "rule"]), ("ip -6 rule", ["ip", "-6", "rule"]),
                       ("routes", ["ip", "route", "show", "table", "all"]),
                       ("routes6", ["ip", "-6", "route", "show", "table", "all"])):  # fmt: skip
        result = where.exec(argv, timeout=30)
        lines = [ln for ln in result.stdout.splitlines() if not ln.startswith(":")]
        out[name] = _lines(subprocess.CompletedProcess(argv, 0, "\n".join(lines)))
    return out


def _processes(root: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    return []


def _fds(procs: Sequence[psutil.Process]) -> tuple[int, int, int]:
    """(descriptors, of which BPF objects, of which pipes) these processes hold."""
    total = bpf = pipes = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                total += 1
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
                    bpf += target.startswith(BPF_KINDS)
                    pipes += target.startswith("pipe:")
    return total, bpf, pipes


def _threads(procs: Sequence[psutil.Process]) -> int:
    def count() -> int:
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.num_threads()
        return total

    return min(_looks(count))


def _looks(measure: Callable[[], T]) -> list[T]:
    """A few looks at a figure, 0.1 s apart: the fewest is the one without the thread and the
    connection that serve the sample's own `agent status`."""
    looks = []
    for _ in range(5):
        looks.append(measure())
        time.sleep(0.1)
    return looks


def _rss_mb(procs: Sequence[psutil.Process]) -> float:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / MB


class Bench:
    def __init__(self, opts: Any) -> None:
        self.opts = opts
        self.node: SimNode | None = None
        self.load: subprocess.Popen[str] | None = None  # the steady traffic, between samples
        self.soak = Soak()
        self.began = time.monotonic()

    # -- the node ---------------------------------------------------------------------------
    def build(self) -> tuple[FerryNode, Pod, Pod]:
        log(f"building the node ({self.opts.backend} backend), the client and server pods")
        self.node = node = SimNode("soak")
        server, client = node.add_pod("server"), node.add_pod("client")
        server.start_nginx(HTTP)
        server.start_tcp_echo_server(ECHO)
        config = {"redirection": {"backend": self.opts.backend}}
        ferry = FerryNode(node, workers=self.opts.workers, config=config)
        ferry.start()
        ferry.enroll(client, "soak", "client")
        ferry.enroll(server, "soak", "server")
        return ferry, client, server

    def keep_logs(self, where: Path) -> None:
        """Copy the agent's and the proxies' logs out of the node before it goes."""
        if self.node is None:
            return
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(self.node.tmpdir / "logs", where, dirs_exist_ok=True)
        log(f"logs kept in {where}")

    def teardown(self) -> None:
        if self.node is None:
            return
        with ignoring_stop_signals():
            try:
                self.node.teardown()
            except Exception as exc:
                log(f"teardown of {self.node.name}: {exc}")
        self.node = None

    # -- measuring --------------------------------------------------------------------------
    def sample(self, ferry: FerryNode, cycle: int, steady: Sequence[Pod]) -> Sample:
        """With only the steady pods enrolled and no request in flight (waits for the proxy's
        last connections to end), so that samples compare."""
        assert self.node is not None
        deadline = time.monotonic() + SETTLE
        while True:
            status = ferry.status()
            if not status["proxy"].get("active_connections") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not status["proxy"].get("running"):
            raise RuntimeError(f"after cycle {cycle} no proxy answers: {status['proxy']}")
        proxy_pid = int(status["proxy"]["pid"])
        agent = _processes(ferry.agent.pid if ferry.agent else 0)
        proxy = _processes(proxy_pid)
        agent_fds, agent_bpf, _ = min(_looks(lambda: _fds(agent)))
        proxy_fds, proxy_bpf, proxy_pipes = min(_looks(lambda: _fds(proxy)))
        rules = {f"node {k}": v for k, v in _rules(self.node).items()}
        for pod in steady:
            rules |= {f"{pod.name} {k}": v for k, v in _rules(pod).items()}
        pins = ferry.state_dir / "bpf"
        sample = Sample(
            cycle=cycle,
            at=time.monotonic() - self.began,
            proxy_pid=proxy_pid,
            rules=rules,
            residue=self._residue(ferry, status),
            agent_fds=agent_fds,
            proxy_fds=proxy_fds - proxy_pipes,
            proxy_pipes=proxy_pipes // 2,
            agent_threads=_threads(agent),
            proxy_threads=_threads(proxy),
            bpf_pins=sum(1 for _ in pins.rglob("*")) if pins.exists() else 0,
            bpf_fds=agent_bpf + proxy_bpf,
            agent_rss_mb=round(_rss_mb(agent), 1),
            proxy_rss_mb=round(_rss_mb(proxy), 1),
        )
        self.soak.samples.append(sample)
        log(f"cycle {cycle}: agent {sample.agent_fds} fds {sample.agent_rss_mb} MB, proxy "
            f"{sample.proxy_fds} fds {sample.proxy_rss_mb} MB")  # fmt: skip
        return sample

    def _residue(self, ferry: FerryNode, status: dict[str, Any]) -> dict[str, int]:
        assert self.node is not None
        netns = [n for n in os.listdir("/run/netns") if n.startswith(self.node.name)]
        links = self.node.exec(["ip", "-o", "link", "show"], timeout=30).stdout.splitlines()
        leases = self.node.tmpdir / "ipam" / self.node.name  # host-local: <dataDir>/<network>
        store = json.loads((ferry.state_dir / "enrollments.json").read_text())
        proxy = request(ferry.state_dir / PROXY_SOCKET, {"op": "status"})
        return {
            "netns": len(netns),
            "node links": len(links),
            "ipam leases": sum(1 for p in leases.glob("*") if p.name not in IPAM_BOOKKEEPING),
            "agent workloads": len(status["workloads"]),
            "proxy workloads": len(proxy.get("workloads") or {}),
            "stored enrollments": len(store["workloads"]),
        }

    # -- the soak ---------------------------------------------------------------------------
    def run(self) -> None:
        ferry, client, server = self.build()
        assert self.node is not None
        steady = (client, server)
        try:
            self.sample(ferry, 0, steady)
            self.traffic(client, server)
            for cycle in range(1, self.opts.cycles + 1):
                self.cycle(ferry, server, cycle)
                self.soak.cycles = cycle
                if cycle % self.opts.upgrade_every == 0:
                    self.upgrade(ferry, cycle)
                if cycle % self.opts.sample_every == 0 or cycle == self.opts.cycles:
                    self.finish()
                    self.sample(ferry, cycle, steady)
                    if cycle != self.opts.cycles:
                        self.traffic(client, server)
        finally:
            self.finish()
            self.soak.seconds = time.monotonic() - self.began

    def traffic(self, client: Pod, server: Pod) -> None:
        """Steady requests from `client` to `server` until `finish`."""
        argv = [sys.executable, str(LOAD), "requests", server.ip4, str(HTTP), "--concurrency",
                str(self.opts.concurrency)]  # fmt: skip
        self.load = client.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def finish(self) -> None:
        """End the stretch of steady traffic (a sample counts descriptors with no request in
        flight) and count what it served and what failed."""
        if self.load is None:
            return
        load, self.load = self.load, None
        out, _ = load.communicate(input="", timeout=60)
        result = json.loads(out)
        self.soak.served += result["served"]
        self.soak.failed += result["failed"]
        self.soak.errors += result["errors"]

    def cycle(self, ferry: FerryNode, server: Pod, cycle: int) -> None:
        assert self.node is not None
        pod = self.node.add_pod(f"churn-{cycle}")
        try:
            body: dict[str, Any] = {"op": "enroll", "netns": pod.netns, "namespace": "soak",
                                    "service_account": f"churn-{cycle % 7}"}  # fmt: skip
            reply = request(ferry.state_dir / "agent.sock", body)
            if not reply.get("ok"):
                raise RuntimeError(f"enroll: {reply.get('error')}")
            probe = pod.curl(f"http://{server.ip4}:{HTTP}/", timeout=5)
            if probe.returncode != 0:
                self.soak.churn_failed.append((cycle, f"curl {probe.returncode}: {probe.stderr}"))
            reply = request(ferry.state_dir / "agent.sock", {"op": "unenroll", "netns": pod.netns})
            if not reply.get("ok"):
                raise RuntimeError(f"unenroll: {reply.get('error')}")
        finally:
            self.node.remove_pod(pod)

    def upgrade(self, ferry: FerryNode, cycle: int) -> None:
        old = int(ferry.status()["proxy"]["pid"])
        log(f"cycle {cycle}: upgrading the proxy (pid {old})")
        started = time.monotonic()
        code = ferry.upgrade_proxy().wait(UPGRADE_WAIT)
        if code != 0:
            error = ferry.upgrade_output()[-300:]
        else:
            try:
                gone_at(old, UPGRADE_WAIT)
                error = ""
            except RuntimeError as exc:
                error = str(exc)
        self.soak.upgrades.append(Upgrade(cycle, not error, time.monotonic() - started, error))


def report(bench: Bench) -> str:
    opts, soak = bench.opts, bench.soak
    lines = [
        f"Churn soak: {soak.cycles} pod create/enroll/request/unenroll/delete cycles in "
        f"{soak.seconds:.0f} s, {opts.concurrency} clients of steady traffic (one request per "
        f"connection), a proxy upgrade every {opts.upgrade_every} cycles; {opts.workers} "
        f"worker(s), {opts.backend} backend",
        "",
        "| cycle | s | proxy pid | agent fds | proxy fds | pooled pipes | agent threads | "
        "proxy threads | BPF pins / fds | agent RSS MB | proxy RSS MB |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for s in soak.samples:
        lines.append(
            f"| {s.cycle} | {s.at:.0f} | {s.proxy_pid} | {s.agent_fds} | {s.proxy_fds} | "
            f"{s.proxy_pipes} | "
            f"{s.agent_threads} | {s.proxy_threads} | {s.bpf_pins} / {s.bpf_fds} | "
            f"{s.agent_rss_mb} | {s.proxy_rss_mb} |"
        )
    grown = {k: v for k, v in soak.leaks().items() if v}
    ok = [u for u in soak.upgrades if u.ok]
    slowest = max((u.seconds for u in ok), default=0.0)
    lines += [
        "",
        "| figure | value | target |",
        "|---|--:|--:|",
        f"| leaked rules and routes (node and steady pods) | {soak.leaked('rules')} | 0 |",
        f"| leaked netns, links, IPAM leases, workloads | {soak.leaked('residue')} | 0 |",
        f"| leaked fds (agent + proxy) | {soak.leaked('fds')} | 0 |",
        f"| leaked threads (agent + proxy) | {soak.leaked('threads')} | 0 |",
        f"| leaked BPF objects (pins + fds) | {soak.leaked('bpf')} | 0 |",
        f"| steady requests served / failed | {soak.served} / {soak.failed} | - / 0 |",
        f"| churned pods' requests failed | {len(soak.churn_failed)} of {soak.cycles} | 0 |",
        f"| proxy upgrades ok (slowest, s) | {len(ok)}/{len(soak.upgrades)} ({slowest:.1f}) "
        "| all |",
    ]
    if soak.error:
        lines.append(f"- FAILED: {soak.error}")
    if grown:
        lines.append(f"- grown: {grown}")
    for when, why in soak.errors[:5]:
        lines.append(f"- steady request failed at {when:.3f}: {why}")
    for cycle, why in soak.churn_failed[:5]:
        lines.append(f"- cycle {cycle}: the new pod's request failed: {why}")
    for u in soak.upgrades:
        if not u.ok:
            lines.append(f"- upgrade at cycle {u.cycle} failed: {u.error}")
    verdict = "PASS" if soak.passed else "FAIL"
    lines.append(f"{verdict}: nothing leaked and no request failed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cycles", type=int, default=500, help="pod cycles (default 500)")
    parser.add_argument("--upgrade-every", type=int, default=100, help="cycles (default 100)")
    parser.add_argument("--sample-every", type=int, default=25, help="cycles (default 25)")
    parser.add_argument("--concurrency", type=int, default=4, help="steady clients (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (default 1)")
    parser.add_argument("--backend", default="iptables",
                        choices=("iptables", "nftables", "ebpf"))  # fmt: skip
    opts = parser.parse_args(argv)
    counts = (opts.cycles, opts.upgrade_every, opts.sample_every, opts.concurrency, opts.workers)
    if min(counts) < 1:
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
    except Exception as exc:  # reported as the soak's failure, with the logs kept
        bench.soak.error = f"{type(exc).__name__}: {exc}"
        log(f"soak failed: {bench.soak.error}")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not bench.soak.passed:
            bench.keep_logs(OUT_DIR / "soak-logs")
        bench.teardown()
    print(report(bench), flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    results = OUT_DIR / "soak.json"
    results.write_text(json.dumps({"schema": "ferry.bench.soak/v1", "options": vars(opts),
                                   "soak": asdict(bench.soak), "leaks": bench.soak.leaks()},
                                  indent=2) + "\n")  # fmt: skip
    log(f"results written to {results}")
    return status or (0 if bench.soak.passed else 1)


if __name__ == "__main__":
    sys.exit(main())
