"""Enrollment decisions from labels, the plan, the annotations, and a pod's cgroup (pure tables)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.kube.cgroups import pod_uid
from agent.kube.pods import (
    Enroll,
    KubeObjectError,
    Namespace,
    NetnsRef,
    Pod,
    Relabel,
    Unenroll,
    annotation_patch,
    namespace_from,
    plan,
    pod_from,
    select,
)
from agent.workloads import Workload

SYSTEM = "ferry-system"
UID = "0f3c5b1e-7d2a-4c61-9b8e-2a6f4d9c1e07"


def pod(namespace: str = "shop", host_network: bool = False, phase: str = "Running",
        labels: dict[str, str] | None = None) -> Pod:  # fmt: skip
    return Pod(UID, namespace, "web-0", "node-a", "web", tuple(sorted((labels or {}).items())),
               (), host_network, phase)  # fmt: skip


ON = {"ferry.dev/mesh": "enabled"}
ENABLED_NS = Namespace("shop", (("ferry.dev/mesh", "enabled"),))
PLAIN_NS = Namespace("shop")


@pytest.mark.parametrize(
    ("the_pod", "namespace", "enroll", "rule"),
    [
        (pod(labels=ON), PLAIN_NS, True, "pod label ferry.dev/mesh=enabled"),
        (pod(), ENABLED_NS, True, "namespace label ferry.dev/mesh=enabled"),
        (pod(labels={"ferry.dev/mesh": "disabled"}), ENABLED_NS, False,
         "pod label ferry.dev/mesh=disabled"),
        (pod(), PLAIN_NS, False, "not selected"),
        (pod(), None, False, "not selected"),  # its namespace not seen (yet)
        (pod(labels={"ferry.dev/mesh": "yes"}), PLAIN_NS, False, "not selected"),  # only "enabled"
        (pod(host_network=True, labels=ON), ENABLED_NS, False,
         "host network"),
        (pod(namespace=SYSTEM, labels=ON), Namespace(SYSTEM), False,
         "Ferry's own pod"),
        (pod(labels={"app.kubernetes.io/part-of": "ferry"}), ENABLED_NS, False, "Ferry's own pod"),
        (pod(phase="Succeeded"), ENABLED_NS, False, "pod finished (Succeeded)"),
        (pod(phase="Failed", labels=ON), PLAIN_NS, False,
         "pod finished (Failed)"),
        (pod(phase="Pending"), ENABLED_NS, True, "namespace label"),  # sandbox not up yet
    ],
)  # fmt: skip
def test_enrollment_rule(the_pod: Pod, namespace: Namespace | None, enroll: bool,
                         rule: str) -> None:  # fmt: skip
    selection = select(the_pod, namespace, SYSTEM)
    assert selection.enroll is enroll
    assert selection.rule.startswith(rule), selection.rule


RAW_POD: dict[str, Any] = {
    "metadata": {"name": "web-0", "namespace": "shop", "uid": UID,
                 "labels": {"app": "web", "ferry.dev/mesh": "enabled"},
                 "annotations": {"ferry.dev/redirection": "pending"}},
    "spec": {"nodeName": "node-a", "serviceAccountName": "web", "hostNetwork": False},
    "status": {"phase": "Running"},
}  # fmt: skip


def test_a_pod_object_as_plain_data() -> None:
    parsed = pod_from(RAW_POD)
    assert parsed == Pod(UID, "shop", "web-0", "node-a", "web",
                         (("app", "web"), ("ferry.dev/mesh", "enabled")),
                         (("ferry.dev/redirection", "pending"),), False, "Running")  # fmt: skip
    minimal = {"metadata": {"name": "p", "namespace": "n", "uid": "u"}}
    assert pod_from(minimal).service_account == "default"  # as the API server defaults it
    assert pod_from(minimal).phase == "Pending"
    assert namespace_from({"metadata": {"name": "shop", "labels": {"a": "b"}}}).labels == (
        ("a", "b"),
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metadata": {"name": "web-0", "namespace": "shop"}}, "pod shop/web-0 metadata.uid"),
        ({"metadata": "x"}, "pod: metadata is 'x'"),
        ({"metadata": {**RAW_POD["metadata"], "labels": {"bad key!": "x"}}},
         "pod shop/web-0 metadata.labels: invalid label key 'bad key!'"),
        ({"spec": {"serviceAccountName": 7}}, "pod shop/web-0 spec.serviceAccountName is 7"),
        ({"spec": "x"}, "pod shop/web-0: spec and status must be objects"),
    ],
)  # fmt: skip
def test_a_malformed_pod_is_refused_naming_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(KubeObjectError) as caught:
        pod_from({**RAW_POD, **change})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # cgroup v2, systemd driver (kubelet + containerd, the common default)
        ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f3c5b1e_7d2a_4c61"
         "_9b8e_2a6f4d9c1e07.slice/cri-containerd-5a1b2c3d4e5f.scope", UID),
        ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3c5b1e_7d2a_4c61"
         "_9b8e_2a6f4d9c1e07.slice/cri-containerd-5a1b2c3d4e5f.scope", UID),
        # guaranteed QoS: right under kubepods.slice
        ("0::/kubepods.slice/kubepods-pod0f3c5b1e_7d2a_4c61_9b8e_2a6f4d9c1e07.slice/"
         "cri-containerd-5a1b.scope", UID),
        # cgroup v1, cgroupfs driver, one line per hierarchy
        ("12:memory:/kubepods/besteffort/pod0f3c5b1e-7d2a-4c61-9b8e-2a6f4d9c1e07/5a1b2c3d4e5f\n"
         "11:cpu,cpuacct:/kubepods/besteffort/pod0f3c5b1e-7d2a-4c61-9b8e-2a6f4d9c1e07/5a1b2c3d4e5f",
         UID),
        ("4:pids:/kubepods/pod0f3c5b1e-7d2a-4c61-9b8e-2a6f4d9c1e07/5a1b2c3d4e5f", UID),
        # cgroup v1 with the systemd driver, and a hybrid host (v1 lines, then the v2 line)
        ("10:devices:/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f3c5b1e_"
         "7d2a_4c61_9b8e_2a6f4d9c1e07.slice/docker-5a1b.scope\n1:name=systemd:/kubepods.slice/"
         "kubepods-besteffort.slice/kubepods-besteffort-pod0f3c5b1e_7d2a_4c61_9b8e_2a6f4d9c1e07"
         ".slice/docker-5a1b.scope\n0::/", UID),
        # kind / containerd in a container: the node's own cgroup is a prefix
        ("0::/system.slice/docker-1234.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-"
         "kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f3c5b1e_7d2a_4c61_9b8e_"
         "2a6f4d9c1e07.slice/cri-containerd-5a1b.scope", None),  # kubelet-kubepods: not ours
        ("0::/../../kubepods/besteffort/pod0f3c5b1e-7d2a-4c61-9b8e-2a6f4d9c1e07/5a1b", UID),
        # processes in no pod
        ("0::/system.slice/containerd.service", None),
        ("0::/user.slice/user-0.slice/session-3.scope", None),
        ("0::/", None),
        ("12:memory:/docker/pod0f3c5b1e-7d2a-4c61-9b8e-2a6f4d9c1e07", None),  # not under kubepods
        ("", None),
        ("garbage without colons", None),
        ("0::/kubepods/besteffort/podnot-a-uid/5a1b", None),
        ("0::/kubepods/besteffort/POD0F3C5B1E-7D2A-4C61-9B8E-2A6F4D9C1E07/x", UID),
    ],
)  # fmt: skip
def test_pod_uid_from_cgroup(line: str, expected: str | None) -> None:
    assert pod_uid(line) == expected


# --------------------------------------------------------------------------- the plan
def workload(uid: str = "netns-4-100", labels: tuple[tuple[str, str], ...] = (),
             namespace: str = "shop", account: str = "web") -> Workload:  # fmt: skip
    return Workload(uid, "web-0", "/var/run/netns/cni-1", 100, namespace, account, labels=labels)


ENABLED = pod(labels=ON)
REF = NetnsRef("/var/run/netns/cni-1", "netns-4-100", "cni")


def planned(pods: dict[str, Pod], enrolled: dict[str, Workload], refs: dict[str, NetnsRef],
            failures: dict[str, tuple[str, float]] | None = None) -> Any:  # fmt: skip
    return plan(pods, {"shop": PLAIN_NS}, refs, enrolled, failures or {}, 100.0, SYSTEM)


def test_a_selected_pod_with_its_netns_is_enrolled() -> None:
    result = planned({UID: ENABLED}, {}, {UID: REF})
    assert result.actions == (Enroll(ENABLED, REF),)
    assert result.views[UID].state == "pending"


def test_a_selected_pod_without_a_netns_waits() -> None:
    result = planned({UID: ENABLED}, {}, {})
    assert result.actions == ()
    view = result.views[UID]
    assert (view.state, view.reason) == ("pending", "waiting for the pod's network namespace "
                                          "(CNI or process scan)")  # fmt: skip


def test_an_enrolled_pod_whose_labels_changed_is_relabelled() -> None:
    enrolled = workload(labels=(("ferry.dev/mesh", "enabled"), ("version", "v1")))
    result = planned({UID: ENABLED}, {enrolled.uid: enrolled}, {UID: REF})
    assert result.actions == (Relabel(ENABLED, enrolled),)
    assert result.views[UID].state == "enabled"


def test_label_flip_to_disabled_unenrolls() -> None:
    enrolled = workload(labels=ENABLED.labels)
    flipped = pod(labels={"ferry.dev/mesh": "disabled"})
    result = planned({UID: flipped}, {enrolled.uid: enrolled}, {UID: REF})
    assert result.actions == (Unenroll(enrolled, "pod label ferry.dev/mesh=disabled", UID),)
    assert result.views[UID].state is None


def test_an_enrolled_pod_in_sync_needs_nothing() -> None:
    enrolled = workload(labels=ENABLED.labels)
    result = planned({UID: ENABLED}, {enrolled.uid: enrolled}, {UID: REF})
    assert result.actions == ()
    assert result.views[UID].workload == enrolled.uid


def test_a_deleted_pod_is_unenrolled_and_others_are_left_alone() -> None:
    enrolled = workload(labels=ENABLED.labels)
    by_cli = replace(workload(uid="netns-4-200"), name="by-hand")
    result = planned({}, {enrolled.uid: enrolled, by_cli.uid: by_cli}, {UID: REF})
    assert result.actions == (Unenroll(enrolled, "pod deleted", UID),)


def test_a_workload_under_another_identity_is_replaced() -> None:
    other = workload(labels=ENABLED.labels, account="admin")
    result = planned({UID: ENABLED}, {other.uid: other}, {UID: REF})
    assert [type(a) for a in result.actions] == [Unenroll, Enroll]


def test_a_failed_enrollment_waits_before_it_is_tried_again() -> None:
    recent = {UID: ("netns gone", 99.0)}
    result = planned({UID: ENABLED}, {}, {UID: REF}, recent)
    assert result.actions == ()
    assert (result.views[UID].state, result.views[UID].reason) == ("failed", "netns gone")
    old = {UID: ("netns gone", 10.0)}
    assert planned({UID: ENABLED}, {}, {UID: REF}, old).actions == (Enroll(ENABLED, REF),)


def test_a_pod_being_deleted_stays_enrolled_but_is_never_enrolled_again() -> None:
    deleting = replace(ENABLED, deleting=True)
    enrolled = workload(labels=ENABLED.labels)
    assert planned({UID: deleting}, {enrolled.uid: enrolled}, {UID: REF}).actions == ()
    result = planned({UID: deleting}, {}, {UID: REF})  # the CNI DEL unenrolled it
    assert result.actions == ()
    assert (result.views[UID].state, result.views[UID].rule) == (None, "pod is being deleted")
    raw = {**RAW_POD, "metadata": {**RAW_POD["metadata"],
                                   "deletionTimestamp": "2026-11-30T16:00:00Z"}}  # fmt: skip
    assert pod_from(raw).deleting


@pytest.mark.parametrize(
    ("annotations", "state", "reason", "patch"),
    [
        ((), "enabled", "pod label", {"ferry.dev/redirection": "enabled",
                                      "ferry.dev/redirection-reason": "pod label"}),
        ((("ferry.dev/redirection", "enabled"), ("ferry.dev/redirection-reason", "pod label")),
         "enabled", "pod label", None),
        ((("ferry.dev/redirection", "pending"), ("other", "x")), None, "",
         {"ferry.dev/redirection": None, "ferry.dev/redirection-reason": None}),
        ((("other", "x"),), None, "", None),
    ],
)  # fmt: skip
def test_annotation_patches(annotations: tuple[tuple[str, str], ...], state: Any, reason: str,
                            patch: dict[str, Any] | None) -> None:  # fmt: skip
    from agent.kube.pods import PodView

    view = PodView(replace(ENABLED, annotations=annotations), state is not None, "rule", state,
                   reason)  # fmt: skip
    expected = None if patch is None else {"metadata": {"annotations": patch}}
    assert annotation_patch(view) == expected
