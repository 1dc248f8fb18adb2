"""Reconciliation decisions: compare desired enrollments with what the kernel shows.

The agent gathers an `Observation` per enrolled workload (which namespace its path reaches now,
if any, and what state its redirection is in) and `plan_reconcile` decides, purely, what to do:
forget workloads whose namespace disappeared or was replaced, re-apply redirection that drifted
or went missing, and enroll declared workloads (from the config's `workloads` list) whose
namespace now exists and is not enrolled (by any path: they are given by the uid their namespace
would get).  The agent performs the actions through its one enrollment path and reports them; a
failure is retried on the next tick, because every tick recomputes the whole plan from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.config import WorkloadSpec
from agent.netns_id import NetnsId
from agent.workloads import Workload


@dataclass(frozen=True)
class Observation:
    netns: NetnsId | None  # the namespace the workload's path reaches now; None: gone
    redirection: str  # ok | drifted | missing | unknown (netns gone)
    differences: tuple[str, ...] = ()


@dataclass(frozen=True)
class Forget:
    workload: Workload
    reason: str


@dataclass(frozen=True)
class Repair:
    workload: Workload
    state: str
    differences: tuple[str, ...]


@dataclass(frozen=True)
class EnrollDeclared:
    spec: WorkloadSpec


ReconcileAction = Forget | Repair | EnrollDeclared


def plan_reconcile(
    enrollments: Mapping[str, Workload],
    observed: Mapping[str, Observation],
    declared: Mapping[str, WorkloadSpec],
) -> list[ReconcileAction]:
    """`declared` maps the uids of declared namespaces that exist now to their spec."""
    actions: list[ReconcileAction] = []
    for uid, workload in sorted(enrollments.items()):
        seen = observed.get(uid)
        if seen is None or seen.netns is None:
            actions.append(Forget(workload, f"network namespace {workload.netns} disappeared"))
        elif seen.netns != workload.netns_id:
            actions.append(
                Forget(workload, f"network namespace {workload.netns} was replaced by a new one")
            )
        elif seen.redirection != "ok":
            actions.append(Repair(workload, seen.redirection, seen.differences))
    for uid, spec in sorted(declared.items()):
        if uid not in enrollments:
            actions.append(EnrollDeclared(spec))
    return actions


def describe(action: ReconcileAction) -> str:
    """One log line per action, as `status` and the agent's log show it."""
    match action:
        case Forget(workload=w, reason=reason):
            return f"forgot {w.namespace}/{w.name}: {reason}"
        case Repair(workload=w, state=state, differences=diff):
            detail = f" ({len(diff)} rule(s) differed)" if diff else ""
            return f"repaired redirection of {w.namespace}/{w.name}: was {state}{detail}"
        case EnrollDeclared(spec=spec):
            identity = f"{spec.namespace}/{spec.service_account}"
            return f"enrolled declared workload {spec.netns} as {identity}"
