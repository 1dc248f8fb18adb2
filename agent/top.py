"""`agent top`: this node's top talkers, error rates and recent denials, live in the terminal.

How it works: every `interval` seconds `scrape` reads the proxy's Prometheus endpoint
(`proxy.metrics_address`, the same numbers the dashboards in deploy/grafana/ show) and
`parse_sample` turns the text into a `Sample`: the counters keyed by their labels, and the
gauges.  `render(previous, current)` is pure: every rate is the difference of two samples'
counters over the time between them, so a frame shows what happened in the last interval (a
counter that went down, a proxy restarted, counts from zero).  Three tables:

- top talkers: per workload, direction, security and peer identity, by bytes per second (then
  by total bytes, so an idle node still shows who talked most);
- errors per workload: connections per second, failed upstream connects and denials per second,
  and their share of the connections;
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
    ]
    talkers = []
    for key, counters in current.flows.items():
        before = previous.flows.get(key, {})
        moved = sum(_increase(counters[n], before.get(n)) for n in ("received", "sent"))
        opened = _increase(counters["opened"], before.get("opened"))
        total = counters["received"] + counters["sent"]
        talkers.append((moved / seconds, total, key, opened / seconds))
    talkers.sort(key=lambda t: (-t[0], -t[1], t[2]))
    lines += _table(
        ["WORKLOAD", "DIR", "SECURITY", "PEER", "CONN/S", "TOTAL", "BYTES/S"],
        [
            [
                _workload(key),
                "in" if key[2] == "inbound" else "out",
                key[3],
                _peer(key) or "unknown",
                f"{conn:.1f}",
                _bytes(total),
                f"{_bytes(rate)}/s",
            ]
            for rate, total, key, conn in talkers[:rows]
        ],
        "no traffic yet",
    )
    lines += ["", "ERRORS"]
    per_workload: dict[tuple[str, ...], list[float]] = {}
    for key, counters in current.flows.items():
        before = previous.flows.get(key, {})
        entry = per_workload.setdefault(key[:2], [0.0, 0.0, 0.0])
        entry[0] += _increase(counters["opened"], before.get("opened"))
        entry[1] += _increase(counters["failed"], before.get("failed"))
    denied = _deltas(current.denied, previous.denied)
    for key, count in denied.items():
        per_workload.setdefault(key[:2], [0.0, 0.0, 0.0])[2] += count
    error_rows = []
    for key, (opened, failed, refused) in sorted(per_workload.items()):
        share = (failed + refused) / (opened + refused) if opened + refused else 0.0
        error_rows.append([_workload(key), f"{opened / seconds:.1f}", f"{failed / seconds:.1f}",
                           f"{refused / seconds:.1f}", f"{share:.0%}"])  # fmt: skip
    lines += _table(["WORKLOAD", "CONN/S", "FAILED/S", "DENIED/S", "ERRORS"], error_rows,
                    "no workloads")  # fmt: skip
    lines += ["", "RECENT DENIALS"]
    recent = sorted(((-n, key) for key, n in denied.items() if n > 0))[:rows]
    lines += _table(
        ["WORKLOAD", "SOURCE", "REASON", "COUNT"],
        [[_workload(key), key[4] or "unknown", key[6], f"{-n:.0f}"] for n, key in recent],
        "none in the last interval",
    )
    by_policy = _deltas(current.policy_denials, previous.policy_denials)
    policies = sorted(((-n, key) for key, n in by_policy.items() if n > 0))[:rows]
    if policies:
        lines += [""]
        lines += _table(
            ["WORKLOAD", "DENIED BY POLICY", "ACTION", "COUNT"],
            [
                [_workload(key), key[2] or "(no ALLOW matched)", key[3], f"{-n:.0f}"]
                for n, key in policies
            ],
            "",
        )
    return "\n".join(line[:width] for line in lines) + "\n"


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
