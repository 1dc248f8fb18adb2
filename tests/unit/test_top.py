"""`agent top`'s frames from two scrapes of the proxy's /metrics (pure; golden files).

Regenerate the golden files with UPDATE_GOLDEN=1 after a deliberate change of the layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.top import parse_sample, render

GOLDEN = Path(__file__).parents[1] / "golden" / "top"
CLIENT = "spiffe://cluster.local/ns/shop/sa/client"
SERVER = "spiffe://cluster.local/ns/shop/sa/server"


def flow(workload: str, direction: str, security: str, source: str) -> str:
    return (
        f'workload_namespace="shop",workload="{workload}",direction="{direction}",'
        f'security="{security}",source_identity="{source}",destination_identity="{SERVER}"'
    )


def exposition(opened: int, received: int, sent: int, denied: int, limited: int) -> str:
    """The proxy's /metrics text (the shape agent/proxy/metrics.py writes) for one node: shop/
    client talks to shop/server over mTLS; an outsider reaches shop/server in plaintext."""
    inbound = flow("server", "inbound", "mtls", CLIENT)
    outbound = flow("client", "outbound", "mtls", CLIENT)
    plain = flow("server", "inbound", "plaintext", "unknown")
    return f"""\
# HELP ferry_proxy_connections_opened_total TCP connections relayed
# TYPE ferry_proxy_connections_opened_total counter
ferry_proxy_connections_opened_total{{{inbound}}} {opened}
ferry_proxy_connections_opened_total{{{outbound}}} {opened}
ferry_proxy_connections_opened_total{{{plain}}} {denied + limited + 1}
# HELP ferry_proxy_connect_failures_total upstream connects that failed
# TYPE ferry_proxy_connect_failures_total counter
ferry_proxy_connect_failures_total{{{inbound}}} 0
ferry_proxy_connect_failures_total{{{outbound}}} 0
ferry_proxy_connect_failures_total{{{plain}}} 1
# HELP ferry_proxy_received_bytes_total bytes from client to server
# TYPE ferry_proxy_received_bytes_total counter
ferry_proxy_received_bytes_total{{{inbound}}} {received}
ferry_proxy_received_bytes_total{{{outbound}}} {received}
ferry_proxy_received_bytes_total{{{plain}}} 300
# HELP ferry_proxy_sent_bytes_total bytes from server to client
# TYPE ferry_proxy_sent_bytes_total counter
ferry_proxy_sent_bytes_total{{{inbound}}} {sent}
ferry_proxy_sent_bytes_total{{{outbound}}} {sent}
ferry_proxy_sent_bytes_total{{{plain}}} 900
# HELP ferry_proxy_connections_denied_total connections refused, by reason
# TYPE ferry_proxy_connections_denied_total counter
ferry_proxy_connections_denied_total{{{plain},reason="policy_denied"}} {denied}
ferry_proxy_connections_denied_total{{{plain},reason="rate_limited"}} {limited}
# HELP ferry_policy_decisions_total policy decisions, by policy, action and decision
# TYPE ferry_policy_decisions_total counter
ferry_policy_decisions_total{{workload_namespace="shop",workload="server",policy="shop/no-admin",action="DENY",decision="deny"}} {denied}
ferry_policy_decisions_total{{workload_namespace="shop",workload="server",policy="shop/burst",action="RATELIMIT",decision="allow"}} 10
ferry_policy_decisions_total{{workload_namespace="shop",workload="server",policy="shop/burst",action="RATELIMIT",decision="deny"}} {limited}
# HELP ferry_proxy_http_requests_total inspected HTTP requests, by method and status class
# TYPE ferry_proxy_http_requests_total counter
ferry_proxy_http_requests_total{{workload_namespace="shop",workload="server",method="GET",status_class="2xx"}} {opened * 3}
ferry_proxy_http_requests_total{{workload_namespace="shop",workload="server",method="GET",status_class="4xx"}} {denied}
ferry_proxy_http_requests_total{{workload_namespace="shop",workload="server",method="POST",status_class="5xx"}} {limited}
ferry_proxy_http_requests_total{{workload_namespace="shop",workload="server",method="POST",status_class="none"}} 2
# HELP ferry_proxy_active_connections open relayed connections
# TYPE ferry_proxy_active_connections gauge
ferry_proxy_active_connections 3.0
# HELP ferry_proxy_workloads workloads served by this proxy
# TYPE ferry_proxy_workloads gauge
ferry_proxy_workloads 2.0
# HELP ferry_proxy_agent_connected 1 when the agent is connected
# TYPE ferry_proxy_agent_connected gauge
ferry_proxy_agent_connected {1 if opened < 1000 else 0}
# HELP ferry_build_info Ferry version
# TYPE ferry_build_info gauge
ferry_build_info{{version="0.1.0"}} 1.0
"""  # noqa: E501 - exposition lines are as long as their labels


CASES = {
    # two seconds of traffic: 40 connections, 2 MB in and 8 MB out, 6 denied, 4 rate-limited
    "busy": (
        exposition(100, 1_000_000, 5_000_000, 10, 20),
        exposition(140, 3_000_000, 13_000_000, 16, 24),
        2.0,
    ),
    # nothing happened in the interval: totals still rank the talkers, no recent denials
    "idle": (
        exposition(100, 1_000_000, 5_000_000, 10, 20),
        exposition(100, 1_000_000, 5_000_000, 10, 20),
        2.0,
    ),
    # the proxy restarted (counters went down, so they count from zero) without its agent
    "restarted": (
        exposition(100, 1_000_000, 5_000_000, 10, 20),
        exposition(1000, 2000, 8000, 1, 0),
        1.0,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_frame_matches_its_golden_file(case: str) -> None:
    before, after, seconds = CASES[case]
    frame = render(parse_sample(before, 10.0), parse_sample(after, 10.0 + seconds),
                   address="127.0.0.1:15020")  # fmt: skip
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(frame)
    assert frame == golden.read_text()


def test_top_talkers_are_ranked_by_bytes_per_second_and_rates_are_per_second() -> None:
    before, after, seconds = CASES["busy"]
    frame = render(parse_sample(before, 0.0), parse_sample(after, seconds),
                   address="127.0.0.1:15020")  # fmt: skip
    talkers = frame.split("TOP TALKERS\n")[1].split("\n\n")[0].splitlines()
    assert "shop/client  out  mtls" in talkers[1] and "shop/server  in   mtls" in talkers[2]
    for row in talkers[1:3]:
        assert row.endswith("5.0 MB/s")  # (2 MB + 8 MB) / 2 s
        assert " 20.0 " in row  # 40 connections in 2 s
    assert "plaintext" in talkers[3] and talkers[3].endswith(" 0 B/s")
    errors = frame.split("ERRORS\n")[1].split("\n\n")[0].splitlines()
    assert errors[2].split() == ["shop/server", "25.0", "0.0", "0%", "5.0", "65.0", "3%"]
    denials = frame.split("RECENT DENIALS\n")[1]
    assert "unknown" in denials and "policy_denied" in denials and "shop/no-admin" in denials


def test_a_frame_fits_the_terminal_width() -> None:
    before, after, seconds = CASES["busy"]
    frame = render(parse_sample(before, 0.0), parse_sample(after, seconds),
                   address="127.0.0.1:15020", width=60)  # fmt: skip
    assert max(len(line) for line in frame.splitlines()) == 60
