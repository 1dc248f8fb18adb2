"""Noticing lost redirection between reconciles (pure): which workloads to look at now.

A reboot-like loss (`iptables -t nat -F` in a pod, `nft flush ruleset`, `ip rule flush`, an
eBPF program detached) leaves a pod's traffic bypassing the proxy until someone puts the rules
back.  The reconcile loop does, but only every `agent.reconcile_interval` (10 s), and a full
read-back of every pod each half second would cost a core on a busy node.  So the loss watch
(`agent.redirect.watch`) samples each enrolled pod twice a second with a few syscalls on
descriptors it opened inside the pod's namespace once: a `Sample` holds a `fingerprint` of
what the backend's state is made of (the size and entry count of the iptables tables, the
nftables ruleset generation, the ids of the attached eBPF programs) and whether the pod's
route and rule monitor saw any change since the last sample.

`suspects` decides whom to look at: a workload whose fingerprint differs from the last healthy
one (a new workload has none), or whose routing changed.  Only those get their redirection
applied again, which writes only what is missing; a change that was not Ferry's (the app adding
its own rules, the agent's own enrollment of the pod) costs one such apply and is then the new
healthy fingerprint.  `lost` decides whether that apply was a repair: only what moved between a
sample taken right before it and one right after it (both under the agent's state lock, so no
enrollment or reconcile of the agent's writes in between) counts.  `WatchCounts` is what
`agent status` shows of the watch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

Fingerprint = tuple[int, ...]


@dataclass(frozen=True)
class Sample:
    """One cheap look at a workload's namespace."""

    fingerprint: Fingerprint
    routing_changed: bool = False


def suspects(healthy: Mapping[str, Fingerprint], samples: Mapping[str, Sample]) -> list[str]:
    """The workloads to read back now (by uid, sorted): changed since found healthy, or new."""
    return sorted(
        uid
        for uid, sample in samples.items()
        if sample.routing_changed or healthy.get(uid) != sample.fingerprint
    )


def lost(before: Sample, after: Sample) -> str:
    """What an apply between the two samples wrote back ("rules", "routing", both, or ""):
    the fingerprint moved, or routing messages came in after `before` had drained them."""
    moved = (("rules", after.fingerprint != before.fingerprint), ("routing", after.routing_changed))
    return ", ".join(what for what, changed in moved if changed)


@dataclass
class WatchCounts:
    """What the watch did since the agent started (`agent status`: agent.loss_watch)."""

    interval: float
    samples: int = 0  # workload samples taken
    applied: int = 0  # suspects whose redirection was applied again
    repairs: int = 0  # ... and something of it had been lost
    failures: int = 0  # applies that raised (retried on the next tick)
    last_repair: dict[str, Any] = field(default_factory=dict)

    def repaired(self, at: float, workload: str, lost: str, took: float) -> None:
        self.repairs += 1
        self.last_repair = {
            "at": at,
            "workload": workload,
            "lost": lost,
            "took_ms": round(took * 1e3, 1),
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
