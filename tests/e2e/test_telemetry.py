"""Telemetry end to end: metrics, access logs and traces from real traffic on a simulated node.

One node serves the module: pods `client` and `server` (label app=api: HTTP echo on 8080, TCP
echo on 9000; a policy denies /admin* on 8080, so that port is inspected), 2 proxy workers, an
access log file, traces exported to a local OTLP/HTTP receiver (`sim/otlp_receiver.py`, in the
node's netns, decoding the protobuf requests) and `workload_label_limit: 2`.  Clients run in
the client pod; the metrics are scraped from the proxy's localhost address in the node.

Tunnel traffic needs two nodes that trust one CA (`tunnelled`): failed handshakes at the tunnel
port, counted by reason, and the access log lines of TCP streams carried over the tunnel.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.admin import request
from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner
from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes
from tests.run_id import SIM_PREFIX

RECEIVER = Path(__file__).parents[2] / "sim" / "otlp_receiver.py"
PROBE = Path(__file__).with_name("tls_probe.py")
HTTP, TCP = 8080, 9000
METRICS = "http://127.0.0.1:15020"  # the proxy's
AGENT = "http://127.0.0.1:15021"
DENY_ADMIN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080"], paths: ["/admin*"]}}]
"""


@dataclass
class Telemetry:
    node: SimNode
    ferry: FerryNode
    client: Pod
    server: Pod
    access_log: Path
    spans: Path


def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


def scrape(t: Telemetry, path: str = "/metrics", base: str = METRICS) -> str:
    """The body and the status code (last line) of a GET from inside the node."""
    result = t.node.exec(["curl", "-sS", "-w", "\n%{http_code}", "--max-time", "5", base + path])
    return str(result.stdout)


def samples(t: Telemetry, base: str = METRICS) -> list[tuple[str, dict[str, str], float]]:
    text = scrape(t, base=base).rsplit("\n", 1)[0]
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def value(t: Telemetry, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        v for n, ls, v in samples(t) if n == name and all(ls.get(k) == w for k, w in labels.items())
    )


def log_lines(t: Telemetry, path: Path | None = None) -> list[dict[str, Any]]:
    target = path or t.access_log
    if not target.exists():
        return []
    return [json.loads(line) for line in target.read_text().splitlines()]


def enforced(ferry: FerryNode) -> bool:
    status = request(ferry.state_dir / "proxy.sock", {"op": "status"})
    return all(w["policy_version"] >= 1 for w in status["applied"])


@pytest.fixture(scope="module")
def t(sim_environment: None) -> Iterator[Telemetry]:
    node = SimNode(SIM_PREFIX)
    ferry: FerryNode | None = None
    try:
        policies = node.tmpdir / "policies"
        policies.mkdir()
        (policies / "deny-admin.yaml").write_text(DENY_ADMIN)
        spans, access_log = node.tmpdir / "spans.jsonl", node.tmpdir / "access.log"
        with open(spans, "wb") as out:
            node.popen([sys.executable, str(RECEIVER), "--port", "4318"], stdout=out)
        node.wait_listening(4318)
        server, client = node.add_pod("server"), node.add_pod("client")
        server.start_http_server(HTTP)
        server.start_tcp_echo_server(TCP)
        telemetry = {
            "access_log": str(access_log),
            "otlp_endpoint": "http://127.0.0.1:4318/v1/traces",
            "trace_sample": 1.0,  # traces started here too (default: 1 %)
            "workload_label_limit": 2,
        }
        config = {
            "policy": {"directory": str(policies)},
            "telemetry": telemetry,
            "agent": {"reconcile_interval": 0.5},
        }
        ferry = FerryNode(node, workers=2, config=config)
        ferry.start()
        ferry.enroll(server, "shop", "server", {"app": "api"})
        ferry.enroll(client, "shop", "client")
        wait_until(lambda: enforced(ferry), "every worker enforces the policy")
        tel = Telemetry(node, ferry, client, server, access_log, spans)
        assert samples(tel)  # this scrape gives client and server their workload labels
        yield tel
    except BaseException:
        if ferry is not None:
            print(ferry.log_text())
        raise
    finally:
        node.teardown()


def run_in(pod: Pod, code: str, *args: str) -> str:
    result = pod.exec([sys.executable, "-c", code, *args], timeout=30)
    assert result.returncode == 0, result.stderr
    return str(result.stdout)


ECHO_CLIENT = """
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(count):
    s = socket.create_connection((host, port))
    s.sendall(b"x" * size)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while chunk := s.recv(65536):
        got += len(chunk)
    assert got == size, got
    s.close()
"""

METHOD_CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for method in sys.argv[3:]:
    s = socket.create_connection((host, port))
    s.sendall(f"{method} /m HTTP/1.1\\r\\nHost: api\\r\\nConnection: close\\r\\n\\r\\n".encode())
    while s.recv(65536):
        pass
    s.close()
"""


def test_connection_counts_and_bytes_equal_what_the_clients_sent(t: Telemetry) -> None:
    server = {"workload": t.server.netns, "direction": "inbound"}
    before = {
        name: value(t, name, **server)
        for name in (
            "ferry_proxy_received_bytes_total",
            "ferry_proxy_sent_bytes_total",
            "ferry_proxy_connections_closed_total",
            "ferry_proxy_connection_duration_seconds_count",
        )
    }
    run_in(t.client, ECHO_CLIENT, t.server.ip4, str(TCP), "5", "12345")
    expected = {
        "ferry_proxy_received_bytes_total": 5 * 12345,
        "ferry_proxy_sent_bytes_total": 5 * 12345,
        "ferry_proxy_connections_closed_total": 5,
        "ferry_proxy_connection_duration_seconds_count": 5,
    }

    def grown() -> dict[str, float]:
        return {name: value(t, name, **server) - before[name] for name in before}

    wait_until(lambda: grown() == expected, f"counters grew by {expected} (now {grown()})")

    def connection_lines() -> list[dict[str, Any]]:
        return [
            line
            for line in log_lines(t)
            if line["kind"] == "connection" and line["destination"]["port"] == TCP
        ]

    wait_until(lambda: len(connection_lines()) >= 5, "5 connection lines in the access log")
    lines = connection_lines()
    assert len(lines) == 5
    for line in lines:
        assert line["bytes_received"] == line["bytes_sent"] == 12345
        assert line["source"]["ip"] == t.client.ip4
        assert line["destination"] == {
            "identity": "spiffe://cluster.local/ns/shop/sa/server",
            "ip": t.server.ip4,
            "port": TCP,
        }
        assert line["decision"] == "allow" and line["outcome"] == "closed"
        assert line["duration_ms"] >= 0 and line["time"].endswith("Z")


def test_requests_are_counted_and_a_denied_one_is_logged_with_its_policy(t: Telemetry) -> None:
    server = {"workload": t.server.netns}
    ok = {**server, "method": "GET", "status_class": "2xx"}
    denied = {**server, "method": "GET", "status_class": "4xx"}
    before = (
        value(t, "ferry_proxy_http_requests_total", **ok),
        value(t, "ferry_proxy_http_requests_total", **denied),
        value(t, "ferry_proxy_http_request_duration_seconds_count", **server),
    )
    base = f"http://{t.server.ip4}:{HTTP}"
    result = t.client.curl(f"{base}/ok/1", args=["-o", "/dev/null", f"{base}/ok/2", f"{base}/ok/3"])
    assert result.returncode == 0, result.stderr
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    answer = t.client.curl(
        f"{base}/admin/users?token=secret",
        args=["-w", "%{http_code}", "-H", f"traceparent: {traceparent}"],
    )
    assert answer.stdout.endswith("403"), answer.stdout

    def grown() -> tuple[float, ...]:
        return (
            value(t, "ferry_proxy_http_requests_total", **ok) - before[0],
            value(t, "ferry_proxy_http_requests_total", **denied) - before[1],
            value(t, "ferry_proxy_http_request_duration_seconds_count", **server) - before[2],
        )

    wait_until(lambda: grown() == (3, 1, 3), f"3 allowed, 1 denied request counted ({grown()})")

    def denial() -> list[dict[str, Any]]:
        return [line for line in log_lines(t) if line.get("trace_id") == trace_id]

    (line,) = wait_until(denial, "the denied request in the access log")
    assert line["kind"] == "request" and line["decision"] == "deny"
    assert line["policy"] == "shop/deny-admin" and line["status"] == 403
    assert line["method"] == "GET" and line["path"] == "/admin/users"  # never the query
    assert "secret" not in json.dumps(line)
    assert line["source"]["ip"] == t.client.ip4
    assert line["destination"]["port"] == HTTP


def spans(t: Telemetry) -> list[dict[str, Any]]:
    return [json.loads(line) for line in t.spans.read_text().splitlines()]


def test_traceparent_reaches_the_app_and_a_span_reaches_the_otlp_receiver(t: Telemetry) -> None:
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    url = f"http://{t.server.ip4}:{HTTP}/traced"
    sent = f"traceparent: 00-{trace_id}-{caller}-01"
    seen = json.loads(t.client.curl(url, args=["--fail", "-H", sent]).stdout)
    version, app_trace, parent, flags = seen["headers"]["traceparent"].split("-")
    assert (version, app_trace, flags) == ("00", trace_id, "01")
    assert parent != caller  # the app's parent is the proxy's span
    (span,) = wait_until(
        lambda: [s for s in spans(t) if s["trace_id"] == trace_id], "the span at the receiver"
    )
    assert span["parent_span_id"] == caller and span["span_id"] == parent
    assert span["service"] == "ferry-proxy" and span["kind"] == 2  # SERVER
    assert span["attributes"]["http.response.status_code"] == 200
    assert span["attributes"]["url.path"] == "/traced"

    fresh = t.client.fetch_json(url)["headers"]["traceparent"]  # no traceparent: one started
    _, new_trace, new_span, _ = fresh.split("-")
    (root,) = wait_until(
        lambda: [s for s in spans(t) if s["trace_id"] == new_trace], "the new trace's span"
    )
    assert root["span_id"] == new_span and root["parent_span_id"] == ""


def test_sighup_reopens_the_access_log(t: Telemetry) -> None:
    rotated = t.access_log.with_suffix(".log.1")
    t.access_log.rename(rotated)
    assert t.ferry.proxy is not None
    t.ferry.proxy.send_signal(signal.SIGHUP)
    time.sleep(0.3)  # the workers reopen before their next batch
    t.client.fetch_json(f"http://{t.server.ip4}:{HTTP}/after-rotation")
    line = wait_until(
        lambda: [x for x in log_lines(t) if x.get("path") == "/after-rotation"],
        "the request in the reopened file",
    )
    assert line and not [x for x in log_lines(t, rotated) if x.get("path") == "/after-rotation"]
    assert t.ferry.proxy.poll() is None  # SIGHUP did not end the proxy


def test_label_cardinality_stays_within_its_bound(t: Telemetry) -> None:
    third = t.node.add_pod("third")
    t.ferry.enroll(third, "shop", "third")  # a third workload past workload_label_limit: 2
    run_in(third, ECHO_CLIENT, t.server.ip4, str(TCP), "1", "10")
    methods = ["PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "PURGE",
               "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE",
               "LINK", "UNLINK"]  # fmt: skip
    for client in (t.client, third):  # many distinct clients: addresses, ports, methods
        run_in(client, METHOD_CLIENT, t.server.ip4, str(HTTP), *methods)
    other = {"workload": t.server.netns, "method": "other"}
    wait_until(
        lambda: value(t, "ferry_proxy_http_requests_total", **other) >= 2 * len(methods),
        "the unusual methods counted as other",
    )
    wait_until(
        lambda: value(t, "ferry_proxy_connections_opened_total", workload="other") >= 1,
        "the third workload's traffic under workload=other",
    )
    all_samples = samples(t)
    workloads = {ls["workload"] for _, ls, _ in all_samples if "workload" in ls}
    assert workloads <= {t.client.netns, t.server.netns, "other"}, workloads
    request_methods = {
        ls["method"] for n, ls, _ in all_samples if n == "ferry_proxy_http_requests_total"
    }
    assert request_methods <= {
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "DELETE",
        "CONNECT",
        "OPTIONS",
        "TRACE",
        "PATCH",
        "other",
    }, request_methods


def test_health_and_readiness_on_the_metrics_address(t: Telemetry) -> None:
    assert scrape(t, "/healthz") == "ok\n\n200"
    assert scrape(t, "/readyz") == "ready\n\n200"


def test_the_agent_serves_its_metrics_and_probes(t: Telemetry) -> None:
    assert scrape(t, "/healthz", AGENT) == "ok\n\n200"
    wait_until(lambda: scrape(t, "/readyz", AGENT) == "ready\n\n200", "the agent is ready")

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(n, tuple(sorted(labels.items()))): v for n, labels, v in samples(t, AGENT)}

    ok = ("ferry_agent_workloads", (("state", "ok"),))
    wait_until(lambda: scraped().get(ok, 0) >= 2, "a reconcile read both workloads back")
    agent = scraped()
    assert agent[("ferry_agent_reconcile_runs_total", ())] >= 1
    assert agent[("ferry_agent_enrollment_duration_seconds_count", ())] >= 2
    assert agent[("ferry_agent_policy_rejected", ())] == 0


@dataclass
class Tunnelled:
    """Two nodes that trust one CA: `client` on node a, `server` (TCP echo) and `outsider`
    (never enrolled) on node b, whose proxy writes `access_log`."""

    b: SimNode
    ferry_b: FerryNode
    client: Pod
    server: Pod
    outsider: Pod
    access_log: Path


@pytest.fixture(scope="module")
def tunnelled(
    sim_environment: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tunnelled]:
    nodes = [SimNode(SIM_PREFIX)]
    mesh: Mesh | None = None
    try:
        nodes.append(SimNode(SIM_PREFIX))
        a, b = nodes
        link_nodes(a, b)
        mesh = Mesh(tmp_path_factory.mktemp("tunnelled"))
        access_log = b.tmpdir / "access.log"
        ferry_a = mesh.add(a)
        ferry_b = mesh.add(b, config={"telemetry": {"access_log": str(access_log)}})
        client = a.add_pod("client")
        server, outsider = b.add_pod("server"), b.add_pod("outsider")
        server.start_tcp_echo_server(TCP)
        for ferry in (ferry_a, ferry_b):
            ferry.start()
        ferry_a.enroll(client, "shop", "client")
        ferry_b.enroll(server, "shop", "server")
        mesh.wait_directory(entries=4)  # two pods, v4 and v6 each
        yield Tunnelled(b, ferry_b, client, server, outsider, access_log)
    except BaseException:
        for ferry in mesh.nodes if mesh is not None else ():
            print(ferry.log_text())
        raise
    finally:
        for node in reversed(nodes):
            node.teardown()


def metric(node: SimNode, name: str, **labels: str) -> float:
    """The sum of `name`'s samples on `node`'s proxy whose labels include `labels`."""
    text = node.exec(["curl", "-sS", "--max-time", "5", METRICS + "/metrics"]).stdout
    return sum(
        s.value
        for family in text_string_to_metric_families(str(text))
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_failed_tunnel_handshakes_are_counted_by_reason(
    tunnelled: Tunnelled, tmp_path: Path
) -> None:
    t = tunnelled
    init_ca(tmp_path / "rogue-ca", "cluster.local")
    issue_node(tmp_path / "rogue-ca", "rogue", tmp_path / "rogue")
    rogue = NodeSigner.load(tmp_path / "rogue", "cluster.local").mint("shop", "client", 600)
    server = {"workload": t.server.netns, "direction": "inbound"}
    name = "ferry_proxy_tls_handshake_failures_total"

    def failures() -> dict[str, float]:
        return {r: metric(t.b, name, **server, reason=r) for r in ("no_client_cert", "unknown_ca")}

    before = failures()
    probe = [sys.executable, str(PROBE), t.server.ip4, "15008"]
    for certificate in ([], [str(path) for path in rogue.write(tmp_path)]):
        answer = t.outsider.exec([*probe, *certificate], timeout=30).stdout.strip()
        assert answer.startswith("refused"), answer

    def grown() -> dict[str, float]:
        return {r: n - before[r] for r, n in failures().items()}

    expected = {"no_client_cert": 1, "unknown_ca": 1}
    wait_until(lambda: grown() == expected, f"one failure of each reason ({grown()})")


def test_each_tcp_stream_over_the_tunnel_gets_an_access_log_line(tunnelled: Tunnelled) -> None:
    t = tunnelled
    run_in(t.client, ECHO_CLIENT, t.server.ip4, str(TCP), "3", "4321")

    def stream_lines() -> list[dict[str, Any]]:
        if not t.access_log.exists():
            return []
        lines = [json.loads(line) for line in t.access_log.read_text().splitlines()]
        return [x for x in lines if x["kind"] == "connection" and x["security"] == "mtls"]

    wait_until(lambda: len(stream_lines()) >= 3, "3 stream lines in node b's access log")
    lines = stream_lines()
    assert len(lines) == 3, lines
    for line in lines:
        assert line["direction"] == "inbound" and line["decision"] == "allow"
        assert line["source"] == {
            "identity": "spiffe://cluster.local/ns/shop/sa/client",
            "ip": t.client.ip4,
        }
        assert line["destination"] == {
            "identity": "spiffe://cluster.local/ns/shop/sa/server",
            "ip": t.server.ip4,
            "port": TCP,
        }
        assert line["bytes_received"] == line["bytes_sent"] == 4321
        assert line["outcome"] == "closed" and line["duration_ms"] >= 0
