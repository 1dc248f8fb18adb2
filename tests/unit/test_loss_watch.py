"""The loss watch's decision and its part of `agent status` (pure: no kernel, no agent).

`suspects` picks exactly the workloads whose cheap fingerprint moved since they were last
found healthy, the new ones, and those whose routing changed; `WatchCounts` records repairs as
`agent status` shows them.  The watch on a real node: tests/e2e/test_loss_watch.py.
"""

from __future__ import annotations

import pytest

from agent.config import ConfigError, parse_config
from agent.redirect.loss import Sample, WatchCounts, lost, suspects
from agent.status import render
from tests.unit.test_status import NOW, document

HEALTHY = {"web": (14, 2312, 18, 3032), "db": (7,)}


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ({"web": Sample((14, 2312, 18, 3032)), "db": Sample((7,))}, []),
        ({"web": Sample((14, 2312, 9, 1440)), "db": Sample((7,))}, ["web"]),  # nat flushed
        ({"web": Sample((14, 2312, 18, 3032)), "db": Sample((8,))}, ["db"]),  # nft generation
        ({"web": Sample((14, 2312, 18, 3032), routing_changed=True)}, ["web"]),  # ip rule/route
        ({"new": Sample(()), "db": Sample((7,))}, ["new"]),  # never found healthy yet
        ({"db": Sample((-2,))}, ["db"]),  # the probe failed (-errno): look closer
    ],
    ids=["unchanged", "tables", "generation", "routing", "new", "probe-error"],
)
def test_suspects(samples: dict[str, Sample], expected: list[str]) -> None:
    assert suspects(HEALTHY, samples) == expected


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (Sample((14, 2312)), Sample((14, 2312)), ""),  # the apply wrote nothing: not a loss
        (Sample((14, 2312), routing_changed=True), Sample((14, 2312)), ""),  # drained before
        (Sample((0, 0)), Sample((14, 2312)), "rules"),
        (Sample((14, 2312)), Sample((14, 2312), routing_changed=True), "routing"),
        (Sample((0, 0), routing_changed=True), Sample((14, 2312), True), "rules, routing"),
    ],
    ids=["no-op", "earlier-routing-noise", "rules", "routing", "both"],
)
def test_only_what_the_apply_wrote_back_is_a_loss(
    before: Sample, after: Sample, expected: str
) -> None:
    assert lost(before, after) == expected


def test_a_pod_sampled_mid_enrollment_is_not_repaired() -> None:
    """The race the churn soak hit: a sample taken while the agent was still enrolling the pod
    (no rules yet) made it a suspect; the apply then found everything in place.  Whether that
    was a loss compares the samples around the apply, not the early one."""
    mid_enrollment = Sample((0, 0), routing_changed=True)
    assert suspects({}, {"new": mid_enrollment}) == ["new"]
    settled = Sample((14, 2312))
    assert lost(settled, Sample((14, 2312))) == ""


def test_a_repair_is_counted_and_described() -> None:
    counts = WatchCounts(0.5)
    counts.repaired(NOW - 3, "shop/web", "rules", 0.0963)
    counts.repaired(NOW - 2, "shop/db", "rules, routing", 0.05)
    assert counts.to_json() == {
        "interval": 0.5,
        "samples": 0,
        "applied": 0,
        "repairs": 2,
        "failures": 0,
        "last_repair": {"at": NOW - 2, "workload": "shop/db", "lost": "rules, routing",
                        "took_ms": 50.0},
    }  # fmt: skip


def test_agent_status_shows_the_repairs_next_to_the_reconcile() -> None:
    counts = WatchCounts(0.5)
    quiet = document()
    quiet["agent"]["loss_watch"] = counts.to_json()
    assert "loss repair" not in render(quiet)
    counts.repaired(NOW - 3, "shop/web", "rules", 0.1)
    doc = document()
    doc["agent"]["loss_watch"] = counts.to_json()
    assert "last reconcile 4s ago, no changes   1 loss repair(s), last shop/web 3s ago" in render(
        doc
    )


def test_the_watch_interval_is_checked_and_0_turns_it_off() -> None:
    assert parse_config(None).agent.loss_watch_interval == 0.5
    assert parse_config({"agent": {"loss_watch_interval": 0}}).agent.loss_watch_interval == 0.0
    for bad in (-1, 61, "fast", True):
        with pytest.raises(ConfigError, match=rf"agent.loss_watch_interval: {bad!r} must be"):
            parse_config({"agent": {"loss_watch_interval": bad}})
