"""Enrollment decisions, the persisted store and its migration, reconcile planning (pure parts)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.config import WorkloadSpec
from agent.netns_id import NetnsId, nsfs_device
from agent.reconcile import EnrollDeclared, Forget, Observation, Repair, plan_reconcile
from agent.workloads import (
    EnrollmentError,
    EnrollmentStore,
    StoreError,
    Workload,
    check_request,
    find_enrollment,
    migrate_v1,
    new_workload,
    plan_enroll,
    reach,
    without,
)

HOST = NetnsId(4, 4026531833)
FORBIDDEN = {HOST: "the host's network namespace (PID 1's)"}


def workload(name: str, inode: int = 7, sa: str = "web", path: str = "") -> Workload:
    where = Path(path or f"/var/run/netns/{name}")
    return new_workload(where, NetnsId(4, inode), "shop", sa)


def test_the_uid_is_the_namespace_identity_not_its_path() -> None:
    by_name = workload("web", inode=4026532281)
    by_pid = workload("net", inode=4026532281, path="/proc/42/ns/net")
    assert by_name.uid == by_pid.uid == "netns-4-4026532281"
    assert (by_name.name, by_name.netns) == ("web", "/var/run/netns/web")
    assert by_name.netns_id == NetnsId(4, 4026532281)


def test_enroll_twice_is_refused_and_changes_nothing() -> None:
    once = plan_enroll({}, workload("web"), FORBIDDEN).after({})
    with pytest.raises(EnrollmentError, match="'web' is already enrolled as shop/web"):
        plan_enroll(once, workload("web", sa="other"), FORBIDDEN)
    assert once == {"netns-4-7": workload("web")}


def test_the_same_namespace_by_another_path_is_refused_naming_the_enrollment() -> None:
    once = plan_enroll({}, workload("web"), FORBIDDEN).after({})
    again = workload("net", sa="other", path="/proc/42/ns/net")
    with pytest.raises(EnrollmentError) as info:
        plan_enroll(once, again, FORBIDDEN)
    assert "already enrolled as shop/web (as 'web' via /var/run/netns/web, uid netns-4-7)" in str(
        info.value
    )
    assert "agent unenroll web" in str(info.value)


@pytest.mark.parametrize("path", ["/var/run/netns/host", "/proc/self/ns/net", "/proc/1/ns/net"])
def test_a_host_namespace_is_refused_by_any_path(path: str) -> None:
    host = new_workload(Path(path), HOST, "shop", "web")
    with pytest.raises(EnrollmentError) as info:
        plan_enroll({}, host, FORBIDDEN)
    assert "refusing to enroll" in str(info.value)
    assert "the host's network namespace (PID 1's)" in str(info.value)
    assert path in str(info.value)


def test_a_recreated_netns_at_the_same_path_makes_the_old_record_stale() -> None:
    old = workload("web", inode=7)
    current = {old.uid: old, workload("db", inode=9).uid: workload("db", inode=9)}
    plan = plan_enroll(current, workload("web", inode=8), FORBIDDEN)
    assert plan.stale == (old,)
    assert sorted(plan.after(current)) == ["netns-4-8", "netns-4-9"]


@pytest.mark.parametrize(
    ("namespace", "service_account", "mode", "needle"),
    [
        ("Shop", "web", None, "invalid namespace 'Shop'"),
        ("shop", "web_1", None, "invalid service account 'web_1'"),
        ("shop", "-web", None, "'-web'"),
        ("shop", "web", "loose", "invalid mode 'loose'"),
        ("a" * 64, "web", None, "at most 63 characters"),
    ],
)
def test_bad_requests_are_refused_naming_the_value(
    namespace: str, service_account: str, mode: str | None, needle: str
) -> None:
    with pytest.raises(EnrollmentError, match=needle):
        check_request(namespace, service_account, mode)


def test_find_enrollment_by_any_path_or_by_the_name_of_a_gone_one() -> None:
    web, db = workload("web", inode=7), workload("db", inode=9)
    current = {web.uid: web, db.uid: db}
    assert find_enrollment(current, "/proc/42/ns/net", NetnsId(4, 7)) == web
    assert find_enrollment(current, "db", None) == db  # gone: by its name
    assert find_enrollment(current, "/var/run/netns/db", None) == db  # gone: by its path
    # the name now stands for another, not enrolled namespace: the record of that name
    assert find_enrollment(current, "web", NetnsId(4, 99)) == web
    with pytest.raises(EnrollmentError, match="'cache' is not enrolled"):
        find_enrollment(current, "cache", None)
    twin = workload("db", inode=10, path="/tmp/elsewhere/db")
    with pytest.raises(EnrollmentError, match="names several enrollments"):
        find_enrollment({**current, twin.uid: twin}, "db", None)
    assert without(current, web.uid) == {db.uid: db}


def test_reach_never_touches_another_namespace_at_the_same_name(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.touch()
    st = os.stat(live)
    here = new_workload(live, NetnsId(st.st_dev, st.st_ino), "shop", "web")
    assert reach(here, None, None) == live  # the recorded path still reaches it
    assert reach(here, Path("/proc/42/ns/net"), here.netns_id) == Path("/proc/42/ns/net")
    gone = new_workload(live, NetnsId(st.st_dev, st.st_ino + 1), "shop", "web")
    assert reach(gone, live, NetnsId(st.st_dev, st.st_ino)) is None


def test_store_round_trip_is_private(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path)
    with store.locked():
        store.save({"netns-4-7": workload("web")})
    assert store.load() == {"netns-4-7": workload("web")}
    assert json.loads(store.path.read_text())["version"] == 2
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_a_version_1_store_is_migrated_on_load(tmp_path: Path) -> None:
    def v1(name: str, inode: int, path: str) -> dict[str, object]:
        return {
            "uid": path,
            "name": name,
            "netns": path,
            "netns_inode": inode,
            "namespace": "shop",
            "service_account": name,
            "mode": None,
            "ips": ["10.0.0.2"],
        }

    records = [
        v1("web", 7, "/var/run/netns/web"),
        v1("net", 7, "/proc/42/ns/net"),  # the same namespace twice: the bug v2 fixes
        v1("db", 9, "/var/run/netns/db"),
    ]
    store = EnrollmentStore(tmp_path)
    store.path.write_text(json.dumps({"version": 1, "workloads": records}))
    dev = nsfs_device()
    loaded = store.load()
    assert sorted(loaded) == [f"netns-{dev}-7", f"netns-{dev}-9"]
    kept = loaded[f"netns-{dev}-7"]
    assert (kept.netns, kept.netns_dev, kept.ips) == ("/proc/42/ns/net", dev, ("10.0.0.2",))
    with store.locked():
        store.save(loaded)
    assert json.loads(store.path.read_text())["version"] == 2
    assert store.load() == loaded


def test_migrate_v1_is_pure() -> None:
    old = Workload("/var/run/netns/web", "web", "/var/run/netns/web", 7, "shop", "web")
    assert migrate_v1([old], 4) == {"netns-4-7": workload("web")}


def test_an_unknown_store_version_is_refused(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path)
    store.path.write_text(json.dumps({"version": 3, "workloads": []}))
    with pytest.raises(StoreError, match="version 3"):
        store.load()


def test_a_failed_save_names_the_file_and_keeps_the_old_store(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path)
    with store.locked():
        store.save({"netns-4-7": workload("web")})
    before = store.path.read_text()
    store.tmp_path.mkdir()  # the temporary file cannot be opened
    with pytest.raises(StoreError, match=f"cannot save enrollments to {store.path}"):
        store.save({})
    assert store.path.read_text() == before


def test_reconcile_plan() -> None:
    enrolled = {
        w.uid: w
        for w in (workload("ok", 1), workload("gone", 2), workload("new", 3), workload("drift", 4))
    }
    observed = {
        "netns-4-1": Observation(NetnsId(4, 1), "ok"),
        "netns-4-2": Observation(None, "unknown"),
        "netns-4-3": Observation(NetnsId(4, 30), "unknown"),
        "netns-4-4": Observation(NetnsId(4, 4), "drifted", ("-A FERRY_OUTPUT ...",)),
    }
    spec = WorkloadSpec("declared", "shop", "api")
    actions = plan_reconcile(enrolled, observed, {"netns-4-5": spec, "netns-4-1": spec})
    assert actions == [
        Forget(workload("gone", 2), "network namespace /var/run/netns/gone disappeared"),
        Forget(
            workload("new", 3), "network namespace /var/run/netns/new was replaced by a new one"
        ),
        Repair(workload("drift", 4), "drifted", ("-A FERRY_OUTPUT ...",)),
        EnrollDeclared(spec),
    ]
