"""Enrollment decisions, the persisted store and reconcile planning (pure parts)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.config import WorkloadSpec
from agent.reconcile import EnrollDeclared, Forget, Observation, Repair, plan_reconcile
from agent.workloads import EnrollmentError, EnrollmentStore, Workload, plan_enroll, plan_unenroll


def workload(name: str, inode: int = 7) -> Workload:
    return Workload(f"/var/run/netns/{name}", name, f"/var/run/netns/{name}", inode, "shop", "web")


def test_enroll_twice_is_refused_and_changes_nothing() -> None:
    once = plan_enroll({}, workload("web"))
    with pytest.raises(EnrollmentError, match="'web' is already enrolled as shop/web"):
        plan_enroll(once, workload("web"))
    assert once == {"/var/run/netns/web": workload("web")}


def test_a_recreated_netns_replaces_the_stale_record() -> None:
    once = plan_enroll({}, workload("web", inode=7))
    assert plan_enroll(once, workload("web", inode=8))["/var/run/netns/web"].netns_inode == 8


def test_unenroll_of_unknown_netns_is_refused() -> None:
    with pytest.raises(EnrollmentError, match="'db' is not enrolled"):
        plan_unenroll({}, "/var/run/netns/db", "db")


def test_store_round_trip_is_private(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path)
    with store.locked():
        store.save({"/var/run/netns/web": workload("web")})
    assert store.load() == {"/var/run/netns/web": workload("web")}
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_reconcile_plan() -> None:
    enrolled = {
        w.uid: w for w in (workload("ok"), workload("gone"), workload("new", 1), workload("drift"))
    }
    observed = {
        "/var/run/netns/ok": Observation(7, "ok"),
        "/var/run/netns/gone": Observation(None, "unknown"),
        "/var/run/netns/new": Observation(2, "unknown"),
        "/var/run/netns/drift": Observation(7, "drifted", ("-A FERRY_OUTPUT ...",)),
    }
    spec = WorkloadSpec("declared", "shop", "api")
    actions = plan_reconcile(
        enrolled, observed, {"/var/run/netns/declared": spec, "/var/run/netns/ok": spec}
    )
    assert actions == [
        Repair(workload("drift"), "drifted", ("-A FERRY_OUTPUT ...",)),
        Forget(workload("gone"), "network namespace /var/run/netns/gone disappeared"),
        Forget(
            workload("new", 1), "network namespace /var/run/netns/new was replaced by a new one"
        ),
        EnrollDeclared(spec),
    ]
