"""Pods on this node: plain data, the enrollment rules, and the plan that enrolls them (pure).

`pod_from` and `namespace_from` read what Ferry needs from the API server's JSON (a malformed
object raises `KubeObjectError` naming the field and the value).  `select` is the enrollment
rule, first match wins:

    1. the pod uses the host's network (`spec.hostNetwork`)   never: its netns is the node's
    2. the pod is Ferry's own (in the system namespace,        never
       or labelled app.kubernetes.io/part-of=ferry)
    3. the pod has finished (phase Succeeded or Failed)         no: nothing runs in it
    4. pod label ferry.dev/mesh=disabled                        no: the pod opted out
    5. pod label ferry.dev/mesh=enabled                         yes
    6. its namespace has ferry.dev/mesh=enabled                 yes
    7. otherwise                                                no: not selected

The answer carries the rule that applied, which `agent status` shows for every pod.

`plan` compares the whole desired state with what is enrolled and returns the actions, in order:
unenrollments first (a pod deselected or deleted, or enrolled under another identity), then
enrollments of selected pods whose network namespace is known (from the CNI call or a process
scan; never of a pod being deleted, whose sandbox the runtime is tearing down: it stays enrolled
until its CNI DEL), then relabels (a selected, enrolled pod whose labels changed: the workload's
labels are updated in place, connections stay).  A workload enrolled by someone else (`agent
enroll`) is never touched, except when a selected pod's namespace is that workload's: the pod's
identity then wins.  An enrollment that failed is retried after `RETRY_FAILED` seconds.  `plan` also
says, for every pod, its redirection state as the annotations show it:

    ferry.dev/redirection: enabled | pending | failed    (absent: not enrolled)
    ferry.dev/redirection-reason: <why, for pending and failed; the rule for enabled>

`annotation_patch` is the JSON merge patch that brings a pod's annotations there (None when they
are already), so an unchanged pod is never patched again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.names import InvalidName
from agent.names import labels as checked_labels
from agent.workloads import Workload

MESH_LABEL = "ferry.dev/mesh"
PART_OF_LABEL = "app.kubernetes.io/part-of"
STATE_ANNOTATION = "ferry.dev/redirection"
REASON_ANNOTATION = "ferry.dev/redirection-reason"
FINISHED_PHASES = ("Succeeded", "Failed")
RETRY_FAILED = 5.0  # seconds before a failed enrollment is tried again
Labels = tuple[tuple[str, str], ...]
State = Literal["enabled", "pending", "failed"]


class KubeObjectError(ValueError):
    """An object from the API server lacks what Ferry needs; the message names the field."""


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str
    name: str
    node: str
    service_account: str
    labels: Labels = ()
    annotations: Labels = ()
    host_network: bool = False
    phase: str = "Pending"
    deleting: bool = False  # metadata.deletionTimestamp is set: its sandbox is going away

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Labels = ()


def _meta(raw: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    meta = raw.get("metadata")
    if not isinstance(meta, dict):
        raise KubeObjectError(f"{what}: metadata is {meta!r:.80}, expected an object")
    return meta


def _text(value: Any, what: str, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise KubeObjectError(f"{what} is {value!r:.80}, expected a non-empty string")
    return value


def _labels(value: Any, what: str) -> Labels:
    try:
        return checked_labels(value or {})
    except InvalidName as exc:
        raise KubeObjectError(f"{what}: {exc}") from None


def _annotations(value: Any, what: str) -> Labels:
    if not isinstance(value or {}, dict):
        raise KubeObjectError(f"{what} is {value!r:.80}, expected an object")
    return tuple(sorted((str(k), str(v)) for k, v in (value or {}).items()))


def pod_from(raw: Mapping[str, Any]) -> Pod:
    """The pod a `Pod` object describes (its uid, identity, labels, network, phase)."""
    meta = _meta(raw, "pod")
    name = _text(meta.get("name"), "pod metadata.name")
    namespace = _text(meta.get("namespace"), f"pod {name} metadata.namespace")
    what = f"pod {namespace}/{name}"
    spec = raw.get("spec") or {}
    status = raw.get("status") or {}
    if not isinstance(spec, dict) or not isinstance(status, dict):
        raise KubeObjectError(f"{what}: spec and status must be objects")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return Pod(
        uid=_text(meta.get("uid"), f"{what} metadata.uid"),
        namespace=namespace,
        name=name,
        node=_text(spec.get("nodeName"), f"{what} spec.nodeName", required=False),
        service_account=_text(account, f"{what} spec.serviceAccountName"),
        labels=_labels(meta.get("labels"), f"{what} metadata.labels"),
        annotations=_annotations(meta.get("annotations"), f"{what} metadata.annotations"),
        host_network=spec.get("hostNetwork") is True,
        phase=_text(status.get("phase"), f"{what} status.phase", required=False) or "Pending",
        deleting=bool(meta.get("deletionTimestamp")),
    )


def namespace_from(raw: Mapping[str, Any]) -> Namespace:
    meta = _meta(raw, "namespace")
    name = _text(meta.get("name"), "namespace metadata.name")
    return Namespace(name, _labels(meta.get("labels"), f"namespace {name} metadata.labels"))


# --------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class Selection:
    enroll: bool
    rule: str  # the rule that applied, as `agent status` shows it


def select(pod: Pod, namespace: Namespace | None, system_namespace: str) -> Selection:
    """The enrollment rule (see the module doc); `namespace` None: not seen (yet)."""
    labels = dict(pod.labels)
    if pod.host_network:
        return Selection(False, "host network: the pod shares the node's network namespace")
    if pod.namespace == system_namespace or labels.get(PART_OF_LABEL) == "ferry":
        return Selection(False, "Ferry's own pod")
    if pod.phase in FINISHED_PHASES:
        return Selection(False, f"pod finished ({pod.phase})")
    mesh = labels.get(MESH_LABEL)
    if mesh == "disabled":
        return Selection(False, f"pod label {MESH_LABEL}=disabled")
    if mesh == "enabled":
        return Selection(True, f"pod label {MESH_LABEL}=enabled")
    if namespace is not None and dict(namespace.labels).get(MESH_LABEL) == "enabled":
        return Selection(True, f"namespace label {MESH_LABEL}=enabled")
    return Selection(False, f"not selected (no {MESH_LABEL}=enabled on the pod or namespace)")


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class NetnsRef:
    """Where a pod's network namespace is: a path, and the enrollment uid it stats to."""

    path: str
    uid: str  # `NetnsId.uid`
    source: str  # "cni" | "scan"


@dataclass(frozen=True)
class Enroll:
    pod: Pod
    netns: NetnsRef


@dataclass(frozen=True)
class Unenroll:
    workload: Workload
    why: str
    pod_uid: str


@dataclass(frozen=True)
class Relabel:
    pod: Pod
    workload: Workload


Action = Enroll | Unenroll | Relabel


@dataclass(frozen=True)
class PodView:
    """One pod as `agent status` shows it."""

    pod: Pod
    enrolled: bool
    rule: str
    state: State | None  # None: not enrolled (no annotation)
    reason: str
    workload: str = ""  # the enrollment uid, when enrolled


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    views: dict[str, PodView] = field(default_factory=dict)  # by pod uid


def plan(
    pods: Mapping[str, Pod],
    namespaces: Mapping[str, Namespace],
    netns: Mapping[str, NetnsRef],
    enrollments: Mapping[str, Workload],
    failures: Mapping[str, tuple[str, float]],
    now: float,
    system_namespace: str,
) -> Plan:
    """What to do so every pod on the node is enrolled exactly when the rule says (see the
    module doc).  `netns` by pod uid, `enrollments` by workload uid, `failures` by pod uid:
    (the error, when)."""
    unenroll: list[Action] = []
    enroll: list[Action] = []
    relabel: list[Action] = []
    views: dict[str, PodView] = {}
    for uid, pod in sorted(pods.items(), key=lambda kv: kv[1].key):
        selection = select(pod, namespaces.get(pod.namespace), system_namespace)
        ref = netns.get(uid)
        current = enrollments.get(ref.uid) if ref is not None else None
        if not selection.enroll:
            if current is not None:
                unenroll.append(Unenroll(current, selection.rule, uid))
            views[uid] = PodView(pod, False, selection.rule, None, "")
            continue
        if current is not None and (current.namespace, current.service_account) != (
            pod.namespace,
            pod.service_account,
        ):
            why = f"enrolled as {current.namespace}/{current.service_account}, not as the pod"
            unenroll.append(Unenroll(current, why, uid))
            current = None
        if current is not None:
            if current.labels != pod.labels:
                relabel.append(Relabel(pod, current))
            views[uid] = PodView(pod, True, selection.rule, "enabled", selection.rule, current.uid)
            continue
        failed = failures.get(uid)
        if pod.deleting:  # kept while enrolled (fail closed until the CNI DEL), never enrolled
            views[uid] = PodView(pod, False, "pod is being deleted", None, "")
        elif failed is not None and now - failed[1] < RETRY_FAILED:
            views[uid] = PodView(pod, False, selection.rule, "failed", failed[0])
        elif ref is None:
            waiting = "waiting for the pod's network namespace (CNI or process scan)"
            views[uid] = PodView(pod, False, selection.rule, "pending", waiting)
        else:
            enroll.append(Enroll(pod, ref))
            views[uid] = PodView(pod, False, selection.rule, "pending", "enrolling")
    for uid, ref in sorted(netns.items()):
        gone = enrollments.get(ref.uid)
        if uid not in pods and gone is not None:
            unenroll.append(Unenroll(gone, "pod deleted", uid))
    return Plan(tuple(unenroll + enroll + relabel), views)


def annotations_for(view: PodView) -> dict[str, str | None]:
    """The Ferry annotations a pod should carry (None: absent)."""
    if view.state is None:
        return {STATE_ANNOTATION: None, REASON_ANNOTATION: None}
    return {STATE_ANNOTATION: view.state, REASON_ANNOTATION: view.reason[:256]}


def annotation_patch(view: PodView) -> dict[str, Any] | None:
    """The merge patch bringing the pod's annotations to `annotations_for(view)`, or None."""
    have = dict(view.pod.annotations)
    want = annotations_for(view)
    if all(have.get(key) == value for key, value in want.items()):
        return None
    return {"metadata": {"annotations": want}}
