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
removed on exit, failure, Ctrl-C or SIGTERM.  The machinery shared with the same-node benchmark
(`CrossNodeBench` is a `bench.common.PodBench`: wrk, iperf3, pinning, CPU accounting, teardown,
options, report scaffolding) is in `bench.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.admin import request as admin_request
from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner
from bench.common import (
    C1_REPEATS,
    FERRY_CONFIG,
    HTTP_PORT,
    IPERF_PORT,
    OUT_DIR,
    PIN_CPU,
    Check,
    PodBench,
    Wrk,
    add_options,
    add_paths,
    cell,
    checks_json,
    execute,
    figure,
    git_commit,
    json_document,
    log,
    log_errors,
    markdown_table,
    parse_options,
    path_cell,
    preflight,
    proxy_cpu_seconds,
    render_report,
    wrk_cells,
    wrk_columns,
    wrk_error_notes,
    wrk_p50,
    wrk_p99,
    wrk_rps,
)
from bench.envoy import EnvoyProcess
from bench.envoy_mtls import TlsFiles, destination_config, source_config
from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes

T = TypeVar("T")
PATHS = ("direct", "ferry-mtls", "envoy-mtls")
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"
PORTS = (HTTP_PORT, IPERF_PORT)
CERT_TTL = 24 * 3600
RESULTS = OUT_DIR / "cross-node.json"


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


class CrossNodeBench(PodBench[Options, PathResult]):
    def __init__(self, opts: Options) -> None:
        super().__init__(opts, PathResult)
        self.node_a: SimNode | None = None
        self.node_b: SimNode | None = None

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

    def nodes(self) -> list[SimNode | None]:
        return [self.node_a, self.node_b]

    def runners(self) -> dict[str, Callable[[], None]]:
        return {
            "direct": self.run_direct,
            "ferry-mtls": self.run_ferry,
            "envoy-mtls": self.run_envoy,
        }

    @property
    def pods(self) -> tuple[SimNode, SimNode, Pod, Pod]:
        assert self.node_a and self.node_b and self.client and self.server
        return self.node_a, self.node_b, self.client, self.server

    # -- traffic --

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

        def counted(what: str, conns: int, run: Callable[[], Wrk]) -> Wrk:
            return checked(what, lambda _: conns, run)

        name = result.name
        pids = list(proxies.pids().values()) if proxies else []
        labels = ("wrk c=1 pinned", "wrk c=1", "wrk c=64")
        self.keepalive(result, pids, "the proxies", labels, counted)
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
        wrk_error_notes(result, close)
        log(f"{name}: iperf3 1 stream")
        cpu_before = {k: proxy_cpu_seconds(p) for k, p in proxies.pids().items()} if proxies else {}
        result.iperf1_gbps, moved = checked("iperf3 -P 1", lambda _: 2, lambda: self.iperf(1))
        result.iperf1_bytes = moved
        if proxies is not None:
            for label, pid in proxies.pids().items():
                result.cpu_s[label] = proxy_cpu_seconds(pid) - cpu_before[label]
            if moved:
                result.cpu_s_per_gb = sum(result.cpu_s.values()) / (moved / 1e9)
        assert result.c64 is not None
        log(
            f"{name}: c=64 {result.c64.rps:,.0f} req/s, close {close.rps:,.0f} req/s, "
            f"iperf3 {result.iperf1_gbps:.2f} Gbit/s"
        )

    # -- paths --

    def run_ferry(self) -> None:
        result = self.result("ferry-mtls")
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
            self.stop_ferry([a, b], enrolled)
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
            problems = log_errors(ferry.log_text())
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
        result = self.result("envoy-mtls")
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
            self.remove_redirection()
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


# --- report --------------------------------------------------------------------------------------


def table(bench: CrossNodeBench) -> str:
    header = [
        "path",
        *wrk_columns("c=1"),
        "c=1 unpinned p50",
        *wrk_columns("c=64"),
        "close c=64 req/s",
        "close c=64 p99",
        "handshakes (close run)",
        "handshakes/s",
        "iperf3 1 stream (Gbit/s)",
        "proxy CPU s/GB",
    ]
    rows = []
    for name in bench.opts.paths:
        r = bench.results.get(name, PathResult(name))
        rows.append(
            [
                path_cell(name, r),
                *wrk_cells(r.c1),
                wrk_p50(r.c1_free),
                *wrk_cells(r.c64),
                wrk_rps(r.close64),
                wrk_p99(r.close64),
                cell(r.handshakes, ",d"),
                cell(r.handshakes_per_s, ",.1f" if (r.handshakes_per_s or 0) < 10 else ",.0f"),
                cell(r.iperf1_gbps, ".2f"),
                cell(r.cpu_s_per_gb, ".2f"),
            ]
        )
    return "\n".join(markdown_table(header, rows))


def checks(bench: CrossNodeBench) -> list[Check]:
    """(target, passed or None when a figure is missing, the numbers)."""

    def good(r: PathResult | None) -> PathResult | None:
        return r if r is not None and r.error is None else None

    ferry = good(bench.results.get("ferry-mtls"))
    envoy = good(bench.results.get("envoy-mtls"))
    figures: tuple[tuple[str, Callable[[PathResult], float | None], float, str], ...] = (
        ("iperf3 throughput (1 stream)", lambda r: r.iperf1_gbps, 0.8, "Gbit/s"),
        ("keep-alive req/s at c=64", lambda r: r.c64.rps if r.c64 else None, 0.8, "req/s"),
        (
            "new-connection-per-request req/s at c=64",
            lambda r: r.close64.rps if r.close64 else None,
            1.0,
            "req/s",
        ),
    )
    out: list[Check] = []
    for what, get, factor, unit in figures:
        target = f"Ferry mTLS >= {factor:g}x Envoy mTLS on {what}"
        f, e = figure(ferry, get), figure(envoy, get)
        if f is None or e is None:
            out.append((target, None, "missing"))
            continue
        ratio = f / e if e else float("inf")
        detail = f"ferry {f:,.2f} vs envoy {e:,.2f} {unit} ({ratio:.2f}x)"
        out.append((target, f >= factor * e, detail))
    return out


def to_json(bench: CrossNodeBench, elapsed: float) -> dict[str, Any]:
    return json_document(
        "ferry.bench.cross-node/v1",
        bench,
        elapsed,
        paths={name: dataclasses.asdict(r) for name, r in bench.results.items()},
        checks=checks_json(checks(bench)),
        interrupted=bench.interrupted,
    )


def _path_lines(name: str, r: PathResult) -> list[str]:
    """How many runs were verified, the close run's handshakes and the per-proxy CPU."""
    lines = []
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
    return lines


def report(bench: CrossNodeBench, elapsed: float) -> str:
    commit = (git_commit() or "unknown")[:10]
    head = [
        f"## Ferry cross-node benchmark: {bench.opts.workers} proxy worker(s) per node, "
        f"wrk {bench.opts.duration:g}s, iperf3 {bench.opts.iperf_seconds}s"
        f"{', --quick' if bench.opts.quick else ''}, commit {commit}",
        "",
        f"Client pod on node A, server pod on node B, over a veth link.  c=1: wrk, nginx and both "
        f"proxies pinned to CPU {PIN_CPU} (median-p50 run of {C1_REPEATS}), except `c=1 "
        "unpinned`.  Handshakes: TLS handshakes the source proxy completed during the close run.",
    ]
    return render_report(bench, elapsed, head, table(bench), checks(bench), _path_lines)


# --- entry point ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run --cross-node",
        description="direct vs Ferry mTLS vs Envoy mTLS between two simulated nodes",
    )
    add_options(parser)
    add_paths(parser, PATHS)
    args = parser.parse_args(argv)
    options = parse_options(parser, args, PATHS)
    if options["duration"] <= 0:
        parser.error("--duration must be positive")
    return Options(**options)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    status = preflight(envoy="envoy-mtls" in opts.paths)
    if status is not None:
        return status
    return execute(CrossNodeBench(opts), report, to_json, RESULTS)
