"""Which pods the CNI plugin enrolls: the seam between the CNI path and whoever decides (pure).

When the runtime runs `ferry-cni` for a new pod sandbox, the agent turns the invocation into a
`PodRef` (its netns, its container id, the pod's name, namespace and UID from CNI_ARGS, its
addresses from prevResult, and the plugin's settings) and asks a `PodDecider`:

    class PodDecider(Protocol):
        async def decide(self, pod: PodRef, wait: float) -> Decision: ...

with `Decision` one of

    Enroll(namespace, service_account, labels, mode)  enroll it with that identity, now, before
                                                      the plugin answers (so before any app
                                                      container of the pod starts)
    Skip(reason)                                      not to be enrolled: the pod starts as is
    Undecided(reason)                                 the decider cannot say yet (its watcher
                                                      has not seen the pod within `wait`
                                                      seconds): the ADD fails closed, with
                                                      CNI error 11 "try again later", and
                                                      kubelet retries the sandbox

`decide` may wait up to `wait` seconds for what it lacks (a Kubernetes decider waits for its pod
watcher to see the pod); it must not wait longer, since the runtime is waiting for the plugin.
Namespaces in the plugin's `exclude_namespaces` (`excluded`) are skipped before any decider is
asked, exactly as the plugin itself skips them when the agent is down.

`StandaloneDecider` is the decider of a plain host (and of the tests): it enrolls every pod it is
asked about, as `<pod namespace or the plugin's "namespace">/<the plugin's
"service_account">` with the plugin's `labels`.  The Kubernetes decider (enrollment rules from
the `ferry.dev/mesh` labels of the pod and its namespace, identity from the pod's service
account) implements the same protocol and is handed to the agent (`Agent(decider=...)`) instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from agent.cni_protocol import Invocation, PluginSettings, result_ips
from agent.workloads import Mode

POD_NAME = "K8S_POD_NAME"
POD_NAMESPACE = "K8S_POD_NAMESPACE"
POD_UID = "K8S_POD_UID"
POD_INFRA_CONTAINER_ID = "K8S_POD_INFRA_CONTAINER_ID"


@dataclass(frozen=True)
class PodRef:
    """A pod sandbox as the CNI plugin sees it; the Kubernetes fields are "" off Kubernetes."""

    container_id: str  # the sandbox's id (CNI_CONTAINERID)
    netns: str  # path of its network namespace (CNI_NETNS)
    name: str  # K8S_POD_NAME
    namespace: str  # K8S_POD_NAMESPACE
    uid: str  # K8S_POD_UID
    infra_container_id: str  # K8S_POD_INFRA_CONTAINER_ID
    ips: tuple[str, ...]  # from prevResult (what the primary plugin assigned)
    network: str  # the conflist's name
    settings: PluginSettings

    def describe(self) -> str:
        """How messages name the pod: `shop/web-0` or `sandbox 3f2a9c...`."""
        if self.name:
            return f"{self.namespace or '?'}/{self.name}"
        return f"sandbox {self.container_id[:12]}"


@dataclass(frozen=True)
class Enroll:
    namespace: str
    service_account: str
    labels: Mapping[str, str]
    mode: Mode | None = None


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class Undecided:
    reason: str


Decision = Enroll | Skip | Undecided


class PodDecider(Protocol):
    async def decide(self, pod: PodRef, wait: float) -> Decision: ...


def pod_ref(invocation: Invocation) -> PodRef:
    return PodRef(
        container_id=invocation.container_id,
        netns=invocation.netns,
        name=invocation.arg(POD_NAME),
        namespace=invocation.arg(POD_NAMESPACE),
        uid=invocation.arg(POD_UID),
        infra_container_id=invocation.arg(POD_INFRA_CONTAINER_ID),
        ips=result_ips(invocation.prev_result),
        network=invocation.network,
        settings=invocation.settings,
    )


def excluded(pod: PodRef) -> Skip | None:
    """A pod of an excluded namespace is never enrolled (and starts when the agent is down)."""
    if pod.namespace and pod.namespace in pod.settings.exclude_namespaces:
        return Skip(f"namespace {pod.namespace!r} is in the plugin's exclude_namespaces")
    return None


def workload_name(pod: PodRef) -> str:
    """The name `agent status` shows for the pod's workload: the pod's name, else its sandbox."""
    return pod.name or f"cni-{pod.container_id[:12]}"


def standalone_decision(pod: PodRef) -> Decision:
    """Enroll every pod, identity from CNI_ARGS and the plugin's settings."""
    return Enroll(
        namespace=pod.namespace or pod.settings.namespace,
        service_account=pod.settings.service_account,
        labels=dict(pod.settings.labels),
    )


class StandaloneDecider:
    """`standalone_decision` behind the `PodDecider` protocol (answers at once)."""

    async def decide(self, pod: PodRef, wait: float) -> Decision:
        return standalone_decision(pod)
