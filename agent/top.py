"""`agent top`: this node's top talkers, error rates and recent denials, live in the terminal.

How it works: every `interval` seconds `scrape` reads the proxy's Prometheus endpoint
(`proxy.metrics_address`, the same numbers the dashboards in deploy/grafana/ show) and
`parse_sample` turns the text into a `Sample`: the counters keyed by their labels, and the
gauges.  `render(previous, current)` is pure: every rate is the difference of two samples'
counters over the time between them, so a frame shows what happened in the last interval (a
counter that went down, a proxy restarted, counts from zero).  Three tables:

- top talkers: per workload, direction, security and peer identity, by bytes per second (then
  by total bytes, so an idle node still shows who talked most);
- errors per workload: connections per second, failed upstream connects (and their share),
  denials, inspected HTTP requests and those answered 5xx or not at all (and their share);
- recent denials: who was refused in the interval, by source and reason, and the policies that
  denied (or rate-limited) there.

`watch` is the thin loop around them: it draws each frame in place (cursor home, clear), and
with `once` takes two samples one interval apart, prints one frame and returns.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

FLOW_LABELS = ("workload_namespace", "workload", "direction", "security", "source_identity",
               "destination_identity")  # fmt: skip
FLOW_COUNTERS = {
    "ferry_proxy_connections_opened_total": "opened",
    "ferry_proxy_connect_failures_total": "failed",
    "ferry_proxy_received_bytes_total": "received",
    "ferry_proxy_sent_bytes_total": "sent",
}
DENIED = "ferry_proxy_connections_denied_total"
DECISIONS = "ferry_policy_decisions_total"
DECISION_LABELS = ("workload_namespace", "workload", "policy", "action")
REQUESTS = "ferry_proxy_http_requests_total"
REQUEST_LABELS = ("workload_namespace", "workload", "method", "status_class")
SERVER_ERRORS = ("5xx", "none")  # "none": the request got no response at all
CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen: each frame replaces the last

FlowKey = tuple[str, ...]  # FLOW_LABELS' values
DenialKey = tuple[str, ...]  # FLOW_LABELS' values and the reason
DecisionKey = tuple[str, ...]  # DECISION_LABELS' values


@dataclass
class Sample:
    """One scrape of the proxy: counters by their labels, gauges, and when it was taken."""

    at: float
    flows: dict[FlowKey, dict[str, float]] = field(default_factory=dict)
    denied: dict[DenialKey, float] = field(default_factory=dict)
    policy_denials: dict[DecisionKey, float] = field(default_factory=dict)
    requests: dict[tuple[str, ...], float] = field(default_factory=dict)  # REQUEST_LABELS' values
    active: float = 0.0
    workloads: float = 0.0
    agent_connected: bool = False
    version: str = "?"


def parse_sample(text: str, at: float) -> Sample:
    """The Prometheus text exposition of the proxy's /metrics as a `Sample` taken at `at`."""
    sample = Sample(at)
    for family in text_string_to_metric_families(text):
        for name, labels, value in (s[:3] for s in family.samples):
            if name in FLOW_COUNTERS:
                key = tuple(labels.get(label, "") for label in FLOW_LABELS)
                counters = sample.flows.setdefault(key, dict.fromkeys(FLOW_COUNTERS.values(), 0.0))
                counters[FLOW_COUNTERS[name]] += value
            elif name == DENIED:
                key = (*(labels.get(label, "") for label in FLOW_LABELS), labels.get("reason", ""))
                sample.denied[key] = sample.denied.get(key, 0.0) + value
            elif name == DECISIONS and labels.get("decision") == "deny":
                key = tuple(labels.get(label, "") for label in DECISION_LABELS)
                sample.policy_denials[key] = sample.policy_denials.get(key, 0.0) + value
            elif name == REQUESTS:
                key = tuple(labels.get(label, "") for label in REQUEST_LABELS)
                sample.requests[key] = sample.requests.get(key, 0.0) + value
            elif name == "ferry_proxy_active_connections":
                sample.active = value
            elif name == "ferry_proxy_workloads":
                sample.workloads = value
            elif name == "ferry_proxy_agent_connected":
                sample.agent_connected = value == 1
            elif name == "ferry_build_info":
                sample.version = labels.get("version", "?")
    return sample


def _increase(now: float, before: float | None) -> float:
    """How much a counter grew; a counter that went down (proxy restarted) counts from zero."""
    if before is None or now < before:
        return now
    return now - before


def _deltas(now: Mapping[tuple[str, ...], float], before: Mapping[tuple[str, ...], float]
            ) -> dict[tuple[str, ...], float]:  # fmt: skip
    return {key: _increase(value, before.get(key)) for key, value in now.items()}


def _bytes(rate: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if rate < 1000 or unit == "GB":
            return f"{rate:.0f} {unit}" if unit == "B" else f"{rate:.1f} {unit}"
        rate /= 1000
    raise AssertionError("unreachable")


def _table(header: Iterable[str], rows: list[list[str]], empty: str) -> list[str]:
    """Left-aligned columns, the last one right-aligned; `empty` when there are no rows."""
    head = list(header)
    if not rows:
        return [f"  {empty}"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = []
    for row in [head, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=False)]
        out.append("  " + "  ".join([*cells, row[-1].rjust(widths[-1])]).rstrip())
    return out


def _workload(key: tuple[str, ...]) -> str:
    return f"{key[0]}/{key[1]}"


def _peer(key: FlowKey) -> str:
    """The other side of a flow: the destination of outbound, the source of inbound."""
    return key[5] if key[2] == "outbound" else key[4]


def render(previous: Sample, current: Sample, *, address: str, rows: int = 10,
           width: int = 120) -> str:  # fmt: skip
    """One frame: the header, top talkers, errors per workload and recent denials (pure)."""
    seconds = max(current.at - previous.at, 1e-9)
    agent = "agent connected" if current.agent_connected else "AGENT NOT CONNECTED"
    lines = [
        f"Ferry {current.version}  proxy {address}  {agent}  workloads {current.workloads:.0f}  "
        f"open connections {current.active:.0f}  (last {seconds:.1f} s)",
        "",
        "TOP TALKERS",
        *_talkers(previous, current, seconds, rows),
        "",
        "ERRORS",
        *_errors(previous, current, seconds),
        "",
        "RECENT DENIALS",
        *_denials(previous, current, rows),
    ]
    return "\n".join(line[:width] for line in lines) + "\n"


def _talkers(previous: Sample, current: Sample, seconds: float, rows: int) -> list[str]:
    talkers = []
    for key, counters in current.flows.items():
        before = previous.flows.get(key, {})
        moved = sum(_increase(counters[n], before.get(n)) for n in ("received", "sent"))
        opened = _increase(counters["opened"], before.get("opened"))
        total = counters["received"] + counters["sent"]
        talkers.append((moved / seconds, total, key, opened / seconds))
    talkers.sort(key=lambda t: (-t[0], -t[1], t[2]))
    table = []
    for rate, total, key, conn in talkers[:rows]:
        direction = "in" if key[2] == "inbound" else "out"
        table.append([_workload(key), direction, key[3], _peer(key) or "unknown", f"{conn:.1f}",
                      _bytes(total), f"{_bytes(rate)}/s"])  # fmt: skip
    header = ["WORKLOAD", "DIR", "SECURITY", "PEER", "CONN/S", "TOTAL", "BYTES/S"]
    return _table(header, table, "no traffic yet")


def _errors(previous: Sample, current: Sample, seconds: float) -> list[str]:
    """Per workload: connections, failed connects (and their share), denials, inspected HTTP
    requests and those answered 5xx or not at all (and their share), per second."""
    sums: dict[tuple[str, ...], dict[str, float]] = {}

    def add(key: tuple[str, ...], name: str, value: float) -> None:
        entry = sums.setdefault(key[:2], dict.fromkeys(("opened", "failed", "denied",
                                                        "requests", "errors"), 0.0))  # fmt: skip
        entry[name] += value

    for key, counters in current.flows.items():
        before = previous.flows.get(key, {})
        for name in ("opened", "failed"):
            add(key, name, _increase(counters[name], before.get(name)))
    for key, count in _deltas(current.denied, previous.denied).items():
        add(key, "denied", count)
    for key, count in _deltas(current.requests, previous.requests).items():
        add(key, "requests", count)
        if key[3] in SERVER_ERRORS:
            add(key, "errors", count)
    table = []
    for key, n in sorted(sums.items()):
        rate = {name: f"{value / seconds:.1f}" for name, value in n.items()}
        failed = n["failed"] / n["opened"] if n["opened"] else 0.0
        errors = n["errors"] / n["requests"] if n["requests"] else 0.0
        table.append([_workload(key), rate["opened"], rate["failed"], f"{failed:.0%}",
                      rate["denied"], rate["requests"], f"{errors:.0%}"])  # fmt: skip
    header = ["WORKLOAD", "CONN/S", "FAILED/S", "FAILED", "DENIED/S", "HTTP REQ/S", "5XX"]
    return _table(header, table, "no workloads")


def _denials(previous: Sample, current: Sample, rows: int) -> list[str]:
    denied = _deltas(current.denied, previous.denied)
    recent = sorted((-n, key) for key, n in denied.items() if n > 0)[:rows]
    lines = _table(
        ["WORKLOAD", "SOURCE", "REASON", "COUNT"],
        [[_workload(key), key[4] or "unknown", key[6], f"{-n:.0f}"] for n, key in recent],
        "none in the last interval",
    )
    by_policy = _deltas(current.policy_denials, previous.policy_denials)
    policies = sorted((-n, key) for key, n in by_policy.items() if n > 0)[:rows]
    if policies:
        table = [[_workload(key), key[2] or "(no ALLOW matched)", key[3], f"{-n:.0f}"]
                 for n, key in policies]  # fmt: skip
        lines += ["", *_table(["WORKLOAD", "DENIED BY POLICY", "ACTION", "COUNT"], table, "")]
    return lines


# ---------------------------------------------------------------- the loop (thin adapter)
class ScrapeError(RuntimeError):
    """The proxy's metrics endpoint did not answer."""


def scrape(address: str, timeout: float = 2.0) -> Sample:
    """GET http://<address>/metrics and parse it."""
    url = f"http://{address}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        raise ScrapeError(f"proxy metrics at {url}: {exc} (is `agent proxy` running?)") from exc
    return parse_sample(text, time.monotonic())


def watch(address: str, interval: float, once: bool, rows: int, width: Callable[[], int],
          out: TextIO = sys.stdout) -> None:  # fmt: skip
    """Draw a frame every `interval` seconds until interrupted; `once`: one frame, no redraw.
    Raises ScrapeError when `once` cannot scrape; the live view shows the error and goes on."""
    previous: Sample | None = None
    while True:
        try:
            current = scrape(address)
        except ScrapeError as exc:
            if once:
                raise
            out.write(f"{CLEAR}{exc}\n")
            out.flush()
            previous = None
            time.sleep(interval)
            continue
        if previous is not None:
            frame = render(previous, current, address=address, rows=rows, width=width())
            out.write(frame if once else CLEAR + frame)
            out.flush()
            if once:
                return
        previous = current
        time.sleep(interval)
