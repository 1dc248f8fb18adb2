"""`agent status` on a node at its limits: which workload and peer hit which bound, and when.

The proxy reports, per workload, the work it refused (or cut off) at each bound of `limits:`
(`shed`, summed over workers); the table gets a line per workload and a bound hit in the last
minute is a problem (golden file: `status_shed.golden`; regenerate with `UPDATE_GOLDEN=1`).
"""

from __future__ import annotations

from typing import Any

import pytest

from agent.proxy.messages import Applied, Shed, Stats, TunnelCounters
from agent.proxy.metrics import Labelled, MetricsCollector, sum_shed
from agent.status import SHED_RECENT, assess, render
from tests.unit.test_status import NOW, check_golden, document

SHED = [
    {"limit": "connections_per_workload", "count": 4546, "last_peer": "10.1.0.7",
     "last_at": NOW - 3},
    {"limit": "ping_rate", "count": 2,
     "last_peer": "spiffe://cluster.local/ns/shop/sa/rogue", "last_at": NOW - 3600},
]  # fmt: skip


def at_limits(shed: list[dict[str, Any]]) -> dict[str, Any]:
    doc = document()
    doc["workloads"][0]["shed"] = shed
    doc["problems"] = assess(doc)
    doc["healthy"] = not doc["problems"]
    return doc


def test_a_workload_at_a_limit_renders_as_golden() -> None:
    doc = at_limits(SHED)
    assert not doc["healthy"]
    check_golden("status_shed.golden", render(doc))


def test_only_a_recent_refusal_makes_the_node_unhealthy() -> None:
    old = [dict(SHED[1])]
    assert at_limits(old)["healthy"]
    assert "shed ping_rate=2 (last from spiffe://" in render(at_limits(old))
    recent = [dict(SHED[1], last_at=NOW - SHED_RECENT + 1)]
    (problem,) = at_limits(recent)["problems"]
    assert "shop/web: work refused at limit ping_rate" in problem
    assert "spiffe://cluster.local/ns/shop/sa/rogue" in problem


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_shed_counts_add_up_over_workers_and_keep_the_last_peer(workers: int) -> None:
    per_worker = [
        Stats(n, 0, {}, TunnelCounters(), Applied(),
              shed={"w": (Shed("handshakes_per_source", 10, f"10.0.0.{n}", NOW + n),)})
        for n in range(workers)
    ]  # fmt: skip
    (entry,) = sum_shed(per_worker, "w")
    assert entry["count"] == 10 * workers
    assert entry["last_peer"] == f"10.0.0.{workers - 1}" and entry["last_at"] == NOW + workers - 1
    assert sum_shed(per_worker, "other") == []


def test_shed_work_is_exported_per_workload_and_limit() -> None:
    per_worker = [
        Stats(n, 0, {}, TunnelCounters(), Applied(),
              shed={"w": (Shed("connections_per_source", 3, "10.0.0.9", NOW),)})
        for n in range(2)
    ]  # fmt: skip
    collector = MetricsCollector(lambda: per_worker,
                                 lambda: {"w": Labelled("shop", "web", "spiffe://a")},
                                 lambda: True)  # fmt: skip
    (family,) = [f for f in collector.collect() if f.name == "ferry_proxy_shed"]
    (sample,) = [s for s in family.samples if s.name == "ferry_proxy_shed_total"]
    assert sample.labels == {"workload_namespace": "shop", "workload": "web",
                             "limit": "connections_per_source"}  # fmt: skip
    assert sample.value == 6
