"""The proxy's counters, summed over its workers, for `agent status` and for Prometheus.

Each worker reports cumulative `messages.Flow` records per workload (see `agent.proxy.workload`);
`sum_flows` adds them up per (direction, security, peer identity), `totals` per direction, and
`MetricsCollector` exposes them the way Istio labels its TCP metrics: per workload, direction,
security (mtls or plaintext) and source/destination identity, with denials per reason.  Work
shed at a bound (`messages.Shed`) is summed per workload and limit by `sum_shed` (the newest
peer and time win) and exposed as `ferry_proxy_shed_total{limit}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.proxy.messages import COUNTERS, Flow, Stats

FLOW_KEYS = ("direction", "security", "peer_identity")
DIRECTIONS = ("outbound", "inbound")


def sum_flows(per_worker: Iterable[Stats], uid: str) -> list[dict[str, Any]]:
    """One workload's traffic per (direction, security, peer identity), summed over workers."""
    summed: dict[tuple[str, str, str], dict[str, Any]] = {}
    for stats in per_worker:
        for flow in stats.flows.get(uid, ()):
            key = (flow.direction, flow.security, flow.peer_identity)
            entry = summed.setdefault(
                key, {**dict(zip(FLOW_KEYS, key, strict=True)), **dict.fromkeys(COUNTERS, 0),
                      "denied": 0, "denied_by": {}}
            )  # fmt: skip
            _add(entry, flow)
    return [summed[key] for key in sorted(summed)]


def _add(entry: dict[str, Any], flow: Flow) -> None:
    for name in COUNTERS:
        entry[name] += getattr(flow, name)
    entry["denied"] += flow.denied_total
    for reason, count in flow.denied.items():
        entry["denied_by"][reason] = entry["denied_by"].get(reason, 0) + count


def sum_decisions(per_worker: Iterable[Stats], uid: str) -> list[dict[str, Any]]:
    """One workload's policy decisions per (policy, action, decision), summed over workers."""
    summed: dict[tuple[str, str, str], int] = {}
    for stats in per_worker:
        for d in stats.decisions.get(uid, ()):
            key = (d.policy, d.action, d.decision)
            summed[key] = summed.get(key, 0) + d.count
    return [{"policy": p, "action": a, "decision": d, "count": n}
            for (p, a, d), n in sorted(summed.items())]  # fmt: skip


def sum_shed(per_worker: Iterable[Stats], uid: str) -> list[dict[str, Any]]:
    """Work one workload had refused (or cut off), per limit, summed over workers: the count,
    and the last peer and time among them."""
    summed: dict[str, dict[str, Any]] = {}
    for stats in per_worker:
        for shed in stats.shed.get(uid, ()):
            entry = summed.setdefault(
                shed.limit, {"limit": shed.limit, "count": 0, "last_peer": "", "last_at": 0.0}
            )
            entry["count"] += shed.count
            if shed.last_at >= entry["last_at"]:
                entry["last_peer"], entry["last_at"] = shed.last_peer, shed.last_at
    return [summed[limit] for limit in sorted(summed)]


def totals(flows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Counters per direction from `sum_flows` output."""
    out = {d: dict.fromkeys(COUNTERS, 0) for d in DIRECTIONS}
    for flow in flows:
        for name in COUNTERS:
            out[flow["direction"]][name] += flow[name]
    return out


def tunnel_totals(per_worker: Iterable[Stats]) -> dict[str, int]:
    out = {"handshakes": 0, "pooled_connections": 0, "streams": 0}
    for stats in per_worker:
        out["handshakes"] += stats.tunnel.handshakes
        out["pooled_connections"] += stats.tunnel.pooled_connections
        out["streams"] += stats.tunnel.streams
    return out


@dataclass(frozen=True)
class Labelled:
    """What the collector needs to know about one served workload."""

    namespace: str
    name: str
    identity: str


class MetricsCollector(Collector):
    """Prometheus view of the workers' counters (fresh on every scrape)."""

    def __init__(
        self,
        fresh_stats: Callable[[], list[Stats]],
        served: Callable[[], dict[str, Labelled]],
        agent_connected: Callable[[], bool],
    ) -> None:
        self.fresh_stats = fresh_stats
        self.served = served
        self.agent_connected = agent_connected

    def collect(self) -> Iterator[Any]:
        per_worker = self.fresh_stats()
        labels = ["workload_namespace", "workload", "direction", "security", "source_identity",
                  "destination_identity"]  # fmt: skip
        families = {
            key: CounterMetricFamily(f"ferry_proxy_{name}", text, labels=labels)
            for key, name, text in (
                ("connections_opened", "connections_opened", "TCP connections relayed"),
                ("connections_closed", "connections_closed", "relayed TCP connections closed"),
                ("connect_failures", "connect_failures", "upstream connects that failed"),
                ("bytes_received", "received_bytes", "bytes from client to server"),
                ("bytes_sent", "sent_bytes", "bytes from server to client"),
            )
        }
        denied = CounterMetricFamily(
            "ferry_proxy_connections_denied", "connections refused, by reason",
            labels=[*labels, "reason"],
        )  # fmt: skip
        workloads = self.served()
        for uid, workload in sorted(workloads.items()):
            for flow in sum_flows(per_worker, uid):
                peer = flow["peer_identity"] or "unknown"
                source, destination = (
                    (workload.identity, peer) if flow["direction"] == "outbound"
                    else (peer, workload.identity)
                )  # fmt: skip
                values = [workload.namespace, workload.name, flow["direction"], flow["security"],
                          source, destination]  # fmt: skip
                for key, family in families.items():
                    family.add_metric(values, flow[key])
                for reason, count in sorted(flow["denied_by"].items()):
                    denied.add_metric([*values, reason], count)
        decisions = CounterMetricFamily(
            "ferry_policy_decisions", "policy decisions, by policy, action and decision",
            labels=["workload_namespace", "workload", "policy", "action", "decision"],
        )  # fmt: skip
        for uid, workload in sorted(workloads.items()):
            for d in sum_decisions(per_worker, uid):
                values = [workload.namespace, workload.name, d["policy"] or "none",
                          d["action"] or "none", d["decision"]]  # fmt: skip
                decisions.add_metric(values, d["count"])
        shed = CounterMetricFamily(
            "ferry_proxy_shed", "work refused or cut off at a bound of limits:, by limit",
            labels=["workload_namespace", "workload", "limit"],
        )  # fmt: skip
        for uid, workload in sorted(workloads.items()):
            for entry in sum_shed(per_worker, uid):
                shed.add_metric([workload.namespace, workload.name, entry["limit"]], entry["count"])
        yield from families.values()
        yield denied
        yield decisions
        yield shed
        active = GaugeMetricFamily("ferry_proxy_active_connections", "open relayed connections")
        active.add_metric([], sum(s.active for s in per_worker))
        yield active
        enrolled = GaugeMetricFamily("ferry_proxy_workloads", "workloads served by this proxy")
        enrolled.add_metric([], len(workloads))
        yield enrolled
        connected = GaugeMetricFamily(
            "ferry_proxy_agent_connected", "1 when the agent is connected"
        )
        connected.add_metric([], 1 if self.agent_connected() else 0)
        yield connected
        info = GaugeMetricFamily("ferry_build_info", "Ferry version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
