"""The agent's Kubernetes part: pods on this node enrolled by the rules, and the CNI decider.

`KubeController` runs the pod and namespace reflectors (`agent.kube.client`) and reconciles
whenever they change (and every `RESYNC` seconds, sooner while a pod waits for its netns or a
failed enrollment is due again): it reads the pods and namespaces with the
pure parsers, finds the network namespace of every pod it has none for (the CNI plugin reports
new pods through `KubernetesDecider`; pods that ran before are found by `agent.kube.scan`, run
in a thread, once for every pod it has not looked for yet and again every `scan_interval` while
a selected pod still waits), and then, under the agent's state lock, asks `agent.kube.pods.plan`
what to do and does it through the agent's one enrollment path (`agent.enrollment`): enroll,
unenroll, or relabel in place.  It plans once more for the state every pod is in, and patches
the pods whose `ferry.dev/redirection` annotations differ (outside the lock; a PATCH that fails
is counted and logged, rate-limited, and retried on the next reconcile).

A workload is tied to its pod by its network namespace: the pod's `NetnsRef` names the
enrollment uid its namespace has.  That is also how an agent that restarts finds its pods'
enrollments again (the first scan looks for every pod), and how a pod enrolled by the CNI plugin
is recognized.  Objects the parsers refuse are skipped, logged once each, and counted.

`KubernetesDecider` answers the CNI plugin (`agent.cni_enroll.PodDecider`): it records the
sandbox's netns for the pod, waits (at most the plugin's `wait`) until the pod watch has seen
the pod, and decides with the same rule; the CNI service then enrolls it, before any app
container starts, and the next reconcile finds it enrolled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cni_enroll import Decision, Enroll, PodRef, Skip, Undecided
from agent.config import KubernetesConfig
from agent.enrollment import Enrollment
from agent.kube import pods
from agent.kube.client import KubeClient, Reflector
from agent.kube.pods import (
    Action,
    KubeObjectError,
    Namespace,
    NetnsRef,
    Pod,
    PodView,
    annotation_patch,
    namespace_from,
    pod_from,
    select,
)
from agent.kube.scan import scan
from agent.kube.watch import WatchHealth
from agent.netns_id import current_id

log = logging.getLogger("ferry.agent")
RESYNC = 30.0  # seconds between reconciles when nothing changes


class KubeController:
    def __init__(
        self,
        config: KubernetesConfig,
        node: str,
        client: KubeClient,
        enrollment: Enrollment,
        state_lock: asyncio.Lock,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.node = node
        self.client = client
        self.enrollment = enrollment
        self.state_lock = state_lock
        self.clock = clock
        self.netns: dict[str, NetnsRef] = {}  # by pod uid
        self.failures: dict[str, tuple[str, float]] = {}  # by pod uid: (error, when)
        self.views: dict[str, PodView] = {}
        self.scanned_for: set[str] = set()
        self.last_scan = 0.0
        self.scans = 0
        self.annotation_health = WatchHealth("annotations")
        self.bad_objects: dict[str, str] = {}  # "kind ns/name@version" -> why
        self._dirty = asyncio.Event()
        self._pulse = asyncio.Event()
        client.pods.on_change = client.namespaces.on_change = self.poke

    def poke(self) -> None:
        """A pod or namespace changed: reconcile, and wake deciders waiting for a pod."""
        self._dirty.set()
        self._pulse.set()
        self._pulse = asyncio.Event()

    # ---------------------------------------------------------------- reading
    def _parsed(self, reflector: Reflector, parse: Callable[[Any], Any]) -> list[Any]:
        parsed = []
        for (namespace, name), raw in reflector.objects.items():
            try:
                parsed.append(parse(raw))
            except KubeObjectError as exc:
                version = (raw.get("metadata") or {}).get("resourceVersion")
                key = f"{reflector.kind} {namespace}/{name}@{version}"
                if key not in self.bad_objects:
                    log.error("kubernetes: ignoring %s: %s", key, exc)
                    self.bad_objects[key] = str(exc)
        return parsed

    def current_pods(self) -> dict[str, Pod]:
        found: list[Pod] = self._parsed(self.client.pods, pod_from)
        return {p.uid: p for p in found if p.node == self.node}

    def current_namespaces(self) -> dict[str, Namespace]:
        found: list[Namespace] = self._parsed(self.client.namespaces, namespace_from)
        return {n.name: n for n in found}

    def pod_running_as(self, namespace: str, service_account: str) -> tuple[str, str] | None:
        """A pod of this node in `namespace` running as `service_account` (what the CA service
        checks before it signs that identity for this node), or None."""
        for pod in self.current_pods().values():
            if (pod.namespace, pod.service_account) == (namespace, service_account) and (
                pod.phase not in ("Succeeded", "Failed")
            ):
                return pod.namespace, pod.name
        return None

    def note_netns(self, pod_uid: str, path: str, source: str) -> None:
        """The CNI plugin says where a pod's network namespace is."""
        netns = current_id(path)
        if netns is not None:
            self.netns[pod_uid] = NetnsRef(path, netns.uid, source)

    # -------------------------------------------------------------- reconcile
    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self.client.pods.run(), name="watch-pods"),
            asyncio.create_task(self.client.namespaces.run(), name="watch-namespaces"),
        ]
        try:
            while True:
                await self._changed()
                try:
                    await self.reconcile()
                except Exception:  # the next change or resync tries again
                    log.exception("kubernetes: reconciling pods failed")
        finally:
            for task in tasks:
                task.cancel()

    def _next_look(self) -> float:
        """Seconds until the next reconcile without a change: soon while a selected pod waits
        for its netns (the next scan) or a failed enrollment is due again."""
        delay = RESYNC
        if any(v.state == "pending" for v in self.views.values()):
            delay = min(delay, self.config.scan_interval)
        if self.failures:
            delay = min(delay, pods.RETRY_FAILED)
        return delay

    async def _changed(self) -> None:
        loop = asyncio.get_running_loop()
        resync = loop.call_later(self._next_look(), self._dirty.set)
        try:
            await self._dirty.wait()
        finally:
            resync.cancel()
        self._dirty.clear()

    async def reconcile(self) -> None:
        if not (self.client.pods.health.synced and self.client.namespaces.health.synced):
            return
        now = self.clock()
        found, namespaces = self.current_pods(), self.current_namespaces()
        for uid, ref in list(self.netns.items()):
            if (ref.source == "scan" or uid not in found) and not _still(ref):
                del self.netns[uid]  # the process or sandbox is gone: look again
        await self._scan(found, namespaces, now)
        async with self.state_lock:
            planned = self._plan(found, namespaces, now)
            for action in planned.actions:
                await self._perform(action, now)
            planned = self._plan(found, namespaces, now)
            enrolled = self.enrollment.enrollments
            for uid in [u for u in self.netns if u not in found]:
                if self.netns[uid].uid not in enrolled:
                    del self.netns[uid]  # its pod and its enrollment are gone
        self.views = planned.views
        for uid in [u for u in self.failures if u not in found]:
            del self.failures[uid]
        if self.config.annotate:
            await self._annotate(list(planned.views.values()))

    def _plan(self, found: dict[str, Pod], namespaces: dict[str, Namespace],
              now: float) -> pods.Plan:  # fmt: skip
        return pods.plan(found, namespaces, self.netns, self.enrollment.enrollments,
                         self.failures, now, self.config.system_namespace)  # fmt: skip

    async def _scan(self, found: dict[str, Pod], namespaces: dict[str, Namespace],
                    now: float) -> None:  # fmt: skip
        missing = {uid for uid in found if uid not in self.netns}
        waiting = any(
            select(found[uid], namespaces.get(found[uid].namespace), self.config.system_namespace)
            .enroll for uid in missing
        )  # fmt: skip
        fresh = missing - self.scanned_for
        if not fresh and not (waiting and now - self.last_scan >= self.config.scan_interval):
            return
        started = time.monotonic()
        located = await asyncio.to_thread(scan, missing)
        self.scans += 1
        self.scanned_for |= missing
        self.scanned_for &= set(found)
        self.last_scan = now
        for uid, ref in located.items():
            self.netns.setdefault(uid, ref)
        log.debug("kubernetes: scanned processes for %d pod(s) in %.1f ms, found %d",
                  len(missing), (time.monotonic() - started) * 1e3, len(located))  # fmt: skip

    async def _perform(self, action: Action, now: float) -> None:
        try:
            match action:
                case pods.Enroll(pod=pod, netns=ref):
                    labels = dict(pod.labels)
                    await self.enrollment.enroll(
                        ref.path, pod.namespace, pod.service_account, labels=labels, name=pod.name
                    )
                    self.failures.pop(pod.uid, None)
                case pods.Unenroll(workload=workload, why=why):
                    log.info("kubernetes: unenrolling %s: %s", workload.describe(), why)
                    await self.enrollment.unenroll_workload(workload)
                case pods.Relabel(pod=pod, workload=workload):
                    await self.enrollment.relabel(workload, dict(pod.labels))
        except ValueError as exc:  # EnrollmentError, NetnsError: refused or rolled back
            if isinstance(action, pods.Enroll):
                log.warning("kubernetes: enrolling pod %s failed: %s", action.pod.key, exc)
                self.failures[action.pod.uid] = (str(exc), now)
                if action.netns.source == "scan":
                    self.netns.pop(action.pod.uid, None)
            else:
                log.warning("kubernetes: %s failed: %s", type(action).__name__.lower(), exc)

    async def _annotate(self, views: list[PodView]) -> None:
        for view in views:
            patch = annotation_patch(view)
            if patch is None:
                continue
            try:
                await self.client.annotate(view.pod.namespace, view.pod.name, patch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                suppressed = self.annotation_health.failed(
                    f"pod {view.pod.key}: {type(exc).__name__}: {exc}", self.clock()
                )
                if suppressed is not None:
                    log.warning("kubernetes: annotating pod %s failed: %s (%d more unlogged)",
                                view.pod.key, exc, suppressed)  # fmt: skip
            else:
                self.annotation_health.event("", self.clock())

    # ------------------------------------------------------------ CNI decider
    async def wait_for_pod(self, pod: PodRef, wait: float) -> tuple[Pod, Namespace | None] | None:
        """The pod (and its namespace) once the watches have seen it, at most `wait` s."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            pulse = self._pulse
            found = self._find(pod)
            if found is not None:
                return found
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return None
            try:
                async with asyncio.timeout(left):
                    await pulse.wait()
            except TimeoutError:
                pass

    def _find(self, ref: PodRef) -> tuple[Pod, Namespace | None] | None:
        if not self.client.namespaces.health.synced:
            return None
        key = f"{ref.namespace}/{ref.name}"
        pod = next((p for p in self.current_pods().values()
                    if p.uid == ref.uid or (not ref.uid and p.key == key)), None)  # fmt: skip
        if pod is None:
            return None
        return pod, self.current_namespaces().get(pod.namespace)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "pods": [
                {
                    "namespace": v.pod.namespace,
                    "name": v.pod.name,
                    "uid": v.pod.uid,
                    "service_account": v.pod.service_account,
                    "enrolled": v.enrolled,
                    "state": v.state,
                    "rule": v.rule,
                    "reason": v.reason,
                    "workload": v.workload,
                    "netns": self.netns[v.pod.uid].path if v.pod.uid in self.netns else None,
                }
                for v in sorted(self.views.values(), key=lambda v: v.pod.key)
            ],
            "watches": {r.kind: r.health.to_json() for r in self.client.reflectors},
            "annotations": self.annotation_health.to_json(),
            "ignored_objects": dict(sorted(self.bad_objects.items())[-10:]),
            "scans": self.scans,
        }


def _still(ref: NetnsRef) -> bool:
    netns = current_id(Path(ref.path))
    return netns is not None and netns.uid == ref.uid


class KubernetesDecider:
    """The CNI plugin's `PodDecider` on Kubernetes (see the module doc)."""

    def __init__(self, controller: KubeController) -> None:
        self.controller = controller

    async def decide(self, pod: PodRef, wait: float) -> Decision:
        if pod.uid and pod.netns:
            self.controller.note_netns(pod.uid, pod.netns, "cni")
        found = await self.controller.wait_for_pod(pod, wait)
        if found is None:
            return Undecided(f"the pod watch has not seen pod {pod.describe()} within {wait:g} s")
        kpod, namespace = found
        selection = select(kpod, namespace, self.controller.config.system_namespace)
        if not selection.enroll:
            return Skip(selection.rule)
        self.controller.poke()
        return Enroll(kpod.namespace, kpod.service_account, dict(kpod.labels))
