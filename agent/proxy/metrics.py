"""The proxy's counters, summed over its workers, for `agent status` and for Prometheus.

Each worker reports cumulative `messages.Flow` records per workload (see `agent.proxy.workload`);
`sum_flows` adds them up per (direction, security, peer identity), `totals` per direction, and
`MetricsCollector` exposes them the way Istio labels its TCP metrics: per workload, direction,
security (mtls or plaintext) and source/destination identity, with denials per reason.  Work
shed at a bound (`messages.Shed`) is summed per workload and limit by `sum_shed` (the newest
peer and time win) and exposed as `ferry_proxy_shed_total{limit}`.

The workers' `TelemetryStats` (`agent.telemetry.counters`) add inspected HTTP requests by method
and status class, connection and request duration histograms and the access log's lines and
drops; `Applied` gives certificate expiry, `TunnelCounters` the tunnel pool and the failed
tunnel handshakes by reason (`agent.tunnel.handshake_failure`).  Labels are bounded:
`LabelBudget` keeps the first `telemetry.workload_label_limit` workloads and
`identity_label_limit` identities, later ones count under "other" (series are summed), so many
distinct clients or workloads cannot grow the scrape without bound (docs/telemetry.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.proxy.messages import COUNTERS, Flow, Stats
from agent.telemetry.counters import CONNECTION_BUCKETS, REQUEST_BUCKETS, Histogram, Observed
from agent.telemetry.settings import TelemetryConfig

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


OTHER = "other"


class LabelBudget:
    """Bounded label values: the first `limit` distinct values keep their own label (for the
    proxy's life), every later one is reported as "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.kept:
            return value
        if len(self.kept) < self.limit:
            self.kept.add(value)
            return value
        return OTHER


Key = tuple[str, ...]


def sum_histograms(
    records: Iterable[Histogram],
    buckets: tuple[float, ...],
    label: Callable[[Histogram], Key | None],
) -> dict[Key, Observed]:
    """Histogram records summed per label set (`label` None: not reported)."""
    out: dict[Key, Observed] = {}
    for h in records:
        key = label(h)
        if key is None:
            continue
        summed = out.setdefault(key, Observed(len(buckets)))
        summed.counts = [a + b for a, b in zip(summed.counts, h.counts, strict=True)]
        summed.total += h.total
    return out


def _histogram(name: str, text: str, labels: list[str], buckets: tuple[float, ...],
               summed: dict[Key, Observed]) -> HistogramMetricFamily:  # fmt: skip
    family = HistogramMetricFamily(name, text, labels=labels)
    for key, observed in sorted(summed.items()):
        family.add_metric(list(key), observed.cumulative(buckets), observed.total)
    return family


class _Sums:
    """Counter values per label set, summed (bounded labels merge series)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[Key, float]] = {}

    def add(self, family: str, key: Key, value: float) -> None:
        values = self.values.setdefault(family, {})
        values[key] = values.get(key, 0) + value

    def fill(self, family: CounterMetricFamily | GaugeMetricFamily, name: str) -> Any:
        for key, value in sorted(self.values.get(name, {}).items()):
            family.add_metric(list(key), value)
        return family


class MetricsCollector(Collector):
    """Prometheus view of the workers' counters (fresh on every scrape).  Label values are
    bounded (`telemetry.workload_label_limit`, `identity_label_limit`): past the bound a series
    is reported under "other" (docs/telemetry.md)."""

    def __init__(
        self,
        fresh_stats: Callable[[], list[Stats]],
        served: Callable[[], dict[str, Labelled]],
        agent_connected: Callable[[], bool],
        telemetry: TelemetryConfig | None = None,
    ) -> None:
        self.fresh_stats = fresh_stats
        self.served = served
        self.agent_connected = agent_connected
        telemetry = telemetry or TelemetryConfig()
        self.workload_budget = LabelBudget(telemetry.workload_label_limit)
        self.identity_budget = LabelBudget(telemetry.identity_label_limit)

    def _workload(self, workload: Labelled) -> Key:
        if self.workload_budget(f"{workload.namespace}/{workload.name}") == OTHER:
            return (OTHER, OTHER)
        return (workload.namespace, workload.name)

    def _identity(self, identity: str) -> str:
        return identity if identity == "unknown" else self.identity_budget(identity)

    def collect(self) -> Iterator[Any]:
        per_worker = self.fresh_stats()
        workloads = self.served()
        named = {uid: self._workload(w) for uid, w in sorted(workloads.items())}
        sums = _Sums()
        for uid, workload in sorted(workloads.items()):
            who = named[uid]
            for flow in sum_flows(per_worker, uid):
                peer = self._identity(flow["peer_identity"] or "unknown")
                own = self._identity(workload.identity)
                source, destination = (
                    (own, peer) if flow["direction"] == "outbound" else (peer, own)
                )  # fmt: skip
                key = (*who, flow["direction"], flow["security"], source, destination)
                for name in COUNTERS:
                    sums.add(name, key, flow[name])
                for reason, count in flow["denied_by"].items():
                    sums.add("denied", (*key, reason), count)
            for d in sum_decisions(per_worker, uid):
                sums.add("decisions", (*who, d["policy"] or "none", d["action"] or "none",
                                       d["decision"]), d["count"])  # fmt: skip
                if d["action"] == "RATELIMIT" and d["decision"] == "deny":
                    sums.add("rate_limited", who, d["count"])
            for entry in sum_shed(per_worker, uid):
                sums.add("shed", (*who, entry["limit"]), entry["count"])
        lines = dropped = 0
        for stats in per_worker:
            t = stats.telemetry
            lines += t.access_log_lines
            dropped += t.access_log_dropped
            for r in t.requests:
                if r.uid in named:
                    sums.add("requests", (*named[r.uid], r.method, r.status_class), r.count)
            for f in stats.tunnel.handshake_failures:
                if f.uid in named:
                    sums.add("handshake_failures", (*named[f.uid], f.direction, f.reason), f.count)
        wl_labels = ["workload_namespace", "workload"]
        labels = [*wl_labels, "direction", "security", "source_identity", "destination_identity"]
        for fkey, name, text in (
            ("connections_opened", "connections_opened", "TCP connections relayed"),
            ("connections_closed", "connections_closed", "relayed TCP connections closed"),
            ("connect_failures", "connect_failures", "upstream connects that failed"),
            ("bytes_received", "received_bytes", "bytes from client to server"),
            ("bytes_sent", "sent_bytes", "bytes from server to client"),
        ):
            yield sums.fill(CounterMetricFamily(f"ferry_proxy_{name}", text, labels=labels), fkey)
        yield sums.fill(CounterMetricFamily(
            "ferry_proxy_connections_denied", "connections refused, by reason",
            labels=[*labels, "reason"]), "denied")  # fmt: skip
        yield sums.fill(CounterMetricFamily(
            "ferry_policy_decisions", "policy decisions, by policy, action and decision",
            labels=[*wl_labels, "policy", "action", "decision"]), "decisions")  # fmt: skip
        yield sums.fill(CounterMetricFamily(
            "ferry_proxy_shed", "work refused or cut off at a bound of limits:, by limit",
            labels=[*wl_labels, "limit"]), "shed")  # fmt: skip
        yield sums.fill(CounterMetricFamily(
            "ferry_proxy_rate_limited", "connections and requests refused by a rate limit",
            labels=wl_labels), "rate_limited")  # fmt: skip
        yield sums.fill(CounterMetricFamily(
            "ferry_proxy_http_requests", "inspected HTTP requests, by method and status class",
            labels=[*wl_labels, "method", "status_class"]), "requests")  # fmt: skip
        yield sums.fill(CounterMetricFamily(
            "ferry_proxy_tls_handshake_failures", "tunnel TLS handshakes that failed, by reason",
            labels=[*wl_labels, "direction", "reason"]), "handshake_failures")  # fmt: skip
        yield from self._histograms(per_worker, named)
        yield from self._gauges(per_worker, workloads, named)
        yield CounterMetricFamily("ferry_access_log_lines", "access log lines written",
                                  value=lines)  # fmt: skip
        yield CounterMetricFamily("ferry_access_log_dropped",
                                  "access log lines dropped: queue full or write failed",
                                  value=dropped)  # fmt: skip
        info = GaugeMetricFamily("ferry_build_info", "Ferry version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _histograms(self, per_worker: list[Stats], named: dict[str, Key]) -> Iterator[Any]:
        connections = sum_histograms(
            (h for s in per_worker for h in s.telemetry.connection_durations),
            CONNECTION_BUCKETS,
            lambda h: (*named[h.uid], h.direction) if h.uid in named else None,
        )
        yield _histogram("ferry_proxy_connection_duration_seconds", "relayed TCP connections, "
                         "accept to close", ["workload_namespace", "workload", "direction"],
                         CONNECTION_BUCKETS, connections)  # fmt: skip
        requests = sum_histograms(
            (h for s in per_worker for h in s.telemetry.request_durations),
            REQUEST_BUCKETS,
            lambda h: named.get(h.uid),
        )
        yield _histogram("ferry_proxy_http_request_duration_seconds", "inspected HTTP "
                         "requests, request head to response head", ["workload_namespace",
                         "workload"], REQUEST_BUCKETS, requests)  # fmt: skip

    def _gauges(self, per_worker: list[Stats], workloads: dict[str, Labelled],
                named: dict[str, Key]) -> Iterator[Any]:  # fmt: skip
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
        expiry = GaugeMetricFamily(
            "ferry_proxy_certificate_expiry_seconds",
            "seconds until a workload certificate expires (the soonest any worker holds)",
            labels=["workload_namespace", "workload"],
        )
        now, soonest = time.time(), dict[Key, float]()
        for stats in per_worker:
            for uid, not_after in stats.applied.certificates.items():
                if uid in named:
                    key = named[uid]
                    soonest[key] = min(soonest.get(key, not_after), not_after)
        for key, not_after in sorted(soonest.items()):
            expiry.add_metric(list(key), not_after - now)
        yield expiry
        tunnel = tunnel_totals(per_worker)
        yield GaugeMetricFamily("ferry_proxy_tunnel_pooled_connections",
                                "tunnel client connections in the pool",
                                value=tunnel["pooled_connections"])  # fmt: skip
        yield GaugeMetricFamily("ferry_proxy_tunnel_streams", "open tunnel streams",
                                value=tunnel["streams"])  # fmt: skip
        yield CounterMetricFamily("ferry_proxy_tunnel_handshakes", "tunnel TLS handshakes "
                                  "completed, both roles", value=tunnel["handshakes"])  # fmt: skip
