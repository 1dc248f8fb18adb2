"""The Grafana dashboards in deploy/grafana/ against a real Prometheus scraping a real node.

One simulated node with node credentials (so same-node traffic is mutual TLS), a policy folder
with a DENY AuthorizationPolicy and a RateLimitPolicy, three pods (`client` and `server`
enrolled, `outsider` not: a plaintext client), real curl traffic: allowed over mTLS, denied,
rate-limited and plaintext, and a TLS client without a certificate at the tunnel port.
Debian's `prometheus` runs in the node's network namespace and scrapes the proxy's and the
agent's metrics every second.  Then, for every panel's every query (Grafana's variables
replaced by what "All" sends), Prometheus' /api/v1/query must answer `success` (the PromQL
parses and evaluates) with at least one series, and every variable's `label_values` must list
at least one value.  `agent top --once` runs against the same node.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode
from tests.e2e.test_datapath import wait_until
from tests.run_id import SIM_PREFIX

DASHBOARDS = Path(__file__).parents[2] / "deploy" / "grafana"
PROBE = Path(__file__).with_name("tls_probe.py")
PROMETHEUS = "127.0.0.1:9090"
PROXY_METRICS, AGENT_METRICS = "127.0.0.1:15020", "127.0.0.1:15021"  # the defaults
# What Grafana sends for "All" (allValue) and for the rate window at a 1 s scrape interval.
VARIABLES = {"$node": ".*", "$namespace": ".*", "$workload": ".*", "$__rate_interval": "1m",
             "$__range": "1h"}  # fmt: skip
API = {"app": "api"}


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel}: {self.expr}"


def dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]


def promql(text: str) -> str:
    for name, value in VARIABLES.items():
        text = text.replace(name, value)
    assert "$" not in text, f"a Grafana variable the test does not know in {text!r}"
    return text


def panel_queries() -> list[Query]:
    return [
        Query(board["title"], panel["title"], promql(target["expr"]))
        for board in dashboards()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def variable_queries() -> list[Query]:
    """Every `label_values(selector, label)` of the dashboards' query variables."""
    found = []
    for board in dashboards():
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                found.append(Query(board["title"], f"${variable['name']}",
                                   promql(variable["query"]["query"])))  # fmt: skip
    return found


# ------------------------------------------------------------------------------- prometheus
def prometheus_api(node: SimNode, path: str, **params: str) -> dict[str, Any]:
    """GET Prometheus' HTTP API in the node's netns (curl), the decoded answer."""
    args = [arg for key, value in params.items() for arg in ("--data-urlencode", f"{key}={value}")]
    out = node.exec(["curl", "-sS", "-G", *args, f"http://{PROMETHEUS}{path}"], timeout=10)
    assert out.returncode == 0, f"curl {path}: {out.stderr}"
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def start_prometheus(node: SimNode) -> subprocess.Popen[Any]:
    workdir = node.tmpdir / "prometheus"
    workdir.mkdir()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "ferry-proxy", "static_configs": [{"targets": [PROXY_METRICS]}]},
            {"job_name": "ferry-agent", "static_configs": [{"targets": [AGENT_METRICS]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    with log:
        proc = node.popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={PROMETHEUS}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc


def series(node: SimNode, expr: str) -> list[dict[str, Any]]:
    answer = prometheus_api(node, "/api/v1/query", query=expr)
    assert answer["status"] == "success", f"{expr}: {answer}"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


# ------------------------------------------------------------------------------------ node
def policies() -> list[dict[str, Any]]:
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": API}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]},
    }  # fmt: skip
    limit = {
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "one-a-day", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": API}, "rules": [{
            "match": {"ports": [8080], "paths": ["/limited/*"]},
            "bucket": {"maxTokens": 1, "tokensPerFill": 1, "fillInterval": "24h"}}]},
    }  # fmt: skip
    return [deny, limit]


def status_code(pod: Pod, url: str) -> str:
    return str(pod.curl(url, 5.0, ["-o", "/dev/null", "-w", "%{http_code}"]).stdout)


def tunnel_handshake(pod: Pod, ip: str) -> str:
    """TLS without a client certificate to `ip`'s tunnel port: "refused", as it must be."""
    answer = str(pod.exec([sys.executable, str(PROBE), ip, "15008"], timeout=30).stdout).strip()
    return "refused" if answer.startswith("refused") else answer


@dataclass
class Observed:
    """The node under observation and a round of its traffic (the status codes it got)."""

    node: SimNode
    ferry: FerryNode
    traffic: Callable[[], list[str]]


@pytest.fixture(scope="module")
def observed(sim_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    assert shutil.which("prometheus"), "Debian package prometheus (scripts/debian-packages.txt)"
    node = SimNode(SIM_PREFIX)
    try:
        prometheus = start_prometheus(node)
        mesh = Mesh(tmp_path_factory.mktemp("dashboards"))
        mesh.policies.mkdir()
        (mesh.policies / "shop.yaml").write_text(yaml.safe_dump_all(policies()))
        ferry = mesh.add(node, workers=2)
        client, server, outsider = (node.add_pod(n) for n in ("client", "server", "outsider"))
        server.start_http_server(8080)
        ferry.start()
        ferry.enroll(client, "shop", "client")
        ferry.enroll(server, "shop", "server", API)
        mesh.wait_directory(entries=4)
        url = f"http://{server.ip4}:8080"
        # The agent pushes the policy folder within a second; until then /admin/ is allowed.
        wait_until(lambda: status_code(client, f"{url}/admin/x") == "403", "the DENY is enforced")

        def traffic() -> list[str]:
            paths = [(client, "/ok"), (client, "/admin/y"), (client, "/limited/1"),
                     (outsider, "/ok")]  # fmt: skip
            codes = [status_code(pod, f"{url}{path}") for pod, path in paths]
            return [*codes, tunnel_handshake(outsider, server.ip4)]

        assert traffic() == ["200", "403", "200", "200", "refused"]
        # Counters Prometheus first sees already counting do not increase: traffic flows on.
        wait_until(lambda: bool(series(node, "ferry_policy_decisions_total")), "a scrape", 15)
        assert traffic() == ["200", "403", "429", "200", "refused"]
        yield Observed(node, ferry, traffic)
        prometheus.terminate()
        prometheus.wait(10)
    except BaseException:
        for log in sorted(node.tmpdir.glob("*/*.log")):  # Ferry's, the servers', Prometheus'
            print(f"--- {log}\n{log.read_text(errors='replace')[-20000:]}")
        raise
    finally:
        node.teardown()


def test_every_dashboard_query_parses_and_returns_series_on_a_real_prometheus(
    observed: Observed,
) -> None:
    node = observed.node
    queries = panel_queries()
    assert len(dashboards()) == 4 and len(queries) >= 20
    empty: list[Query] = []
    deadline = time.monotonic() + 20  # rates need two scrapes after the traffic
    for query in queries:
        while True:
            answer = prometheus_api(node, "/api/v1/query", query=query.expr)
            assert answer["status"] == "success", f"{query}\n{answer.get('error')}"
            if answer["data"]["result"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not answer["data"]["result"]:
            empty.append(query)
    assert not empty, "queries without series:\n" + "\n".join(map(str, empty))
    for query in variable_queries():
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query.expr)
        assert match, f"{query}: not label_values(selector, label)"
        selector, label = match.groups()
        answer = prometheus_api(node, f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success" and answer["data"], f"{query}: {answer}"


def test_agent_top_once_shows_talkers_errors_and_denials_of_the_live_node(
    observed: Observed,
) -> None:
    top = observed.node.popen(
        [sys.executable, "-m", "agent", "top", "--once", "--interval", "1",
         "--config", str(observed.ferry.config_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while top.poll() is None:  # traffic flows while it samples
        observed.traffic()
    out, err = top.communicate(timeout=10)
    assert top.returncode == 0, err
    client, server = (observed.node.pods[name].netns for name in ("client", "server"))
    rows = [line.split() for line in out.split("TOP TALKERS\n")[1].split("\n\n")[0].splitlines()]
    assert [f"shop/{server}", "in", "mtls", "spiffe://cluster.local/ns/shop/sa/client"] in [
        row[:4] for row in rows
    ], out
    assert [f"shop/{server}", "in", "plaintext", "unknown"] in [row[:4] for row in rows], out
    assert [f"shop/{client}", "out", "mtls", "spiffe://cluster.local/ns/shop/sa/server"] in [
        row[:4] for row in rows
    ], out
    errors = [line.split() for line in out.split("ERRORS\n")[1].split("\n\n")[0].splitlines()]
    server_row = next(row for row in errors if row[0] == f"shop/{server}")
    assert float(server_row[5]) > 0, out  # inspected HTTP requests per second
    denials = out.split("RECENT DENIALS\n")[1]
    assert "policy_denied" in denials and "rate_limited" in denials, out
    assert "shop/no-admin" in denials and "shop/one-a-day" in denials, out
    assert "\x1b[" not in out  # --once draws no escape sequences
