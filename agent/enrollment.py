"""The one enrollment path: admin `enroll`, declared workloads and unenrollment all go through here.

Enrolling a workload is a sequence of steps, each with its undo:

    1. persist       save the new enrollments              undo: save the old ones
    2. proxies       add_workload to every proxy           undo: del_workload
                     (so its listeners exist before any traffic is redirected to them)
    3. certificate   mint it, send it to every proxy       undo: forget it
    4. redirection   program the rules in its netns        undo: remove them
    5. directory     publish this node's entries           undo: publish the old ones

Before any step the request is decided purely (`agent.workloads`: identity names and mode, then
`plan_enroll`: never a host namespace, never a namespace twice by any path), so a bad request is
refused with nothing changed.  The only effects before step 1 are reads (resolving the namespace
to its path and identity, reading its addresses) and, when the plan found one, forgetting a stale
record: another namespace, gone now, was enrolled at the same path.

Unenrolling is the same machinery in the order that stops traffic first:

    1. persist       save the enrollments without it       undo: save the old ones
    2. redirection   remove the rules (if its netns is     undo: apply them again
                     still reachable)
    3. proxies       del_workload                          undo: add_workload and its certificate
    4. certificate   forget it                             undo: mint it again (sent by the
                                                           undo of step 3, which runs next)
    5. directory     publish                               undo: publish the old ones

Relabelling (new labels for policy selectors, e.g. a pod's labels changed) keeps the workload
enrolled and its connections open:

    1. persist       save the enrollments with the new labels  undo: save the old ones
    2. proxies       add_workload again, same uid and netns    undo: the same with the old labels
                     (a proxy updates the labels in place: it compiles the workload's policy
                     again and closes only the connections the new labels no longer allow)

`run_steps` runs a sequence; when step k fails it undoes steps k, k-1, ..., 1 (step k too,
because a step may have half-happened: one table committed, one proxy acked while another
refused; every undo is idempotent), then raises `EnrollmentError` naming the workload, the step
and the cause, plus any undo that failed too (logged with its traceback).  `forget` (its
namespace is gone: reconcile) is unenrollment without the redirection step.

`Enrollment` holds the enrollments in memory (the store's copy is the same after every step) and
talks to its collaborators through small interfaces, and reaches the kernel only through the
callables it is given (resolving a namespace, reading its addresses, the host's namespaces), so
unit tests drive it with recording fakes.  The caller serializes calls (the agent holds its state
lock around each).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from agent.certificates import Certificates
from agent.config import MeshConfig
from agent.control.protocol import WorkloadCertificate
from agent.netns import NetnsError, host_namespaces, resolve_netns
from agent.netns_id import NetnsId
from agent.redirect.backend import RedirectionBackend
from agent.workloads import (
    EnrollmentError,
    Enrollments,
    EnrollmentStore,
    Mode,
    Workload,
    check_request,
    find_enrollment,
    new_workload,
    plan_enroll,
    reach,
    without,
)

log = logging.getLogger("ferry.agent")


class Proxies(Protocol):
    async def add_workload(self, workload: Workload, mode: Mode) -> int: ...

    async def del_workload(self, uid: str) -> int: ...

    async def send_certificate(self, certificate: WorkloadCertificate) -> int: ...


class DirectoryPublisher(Protocol):
    async def publish(self, enrollments: Mapping[str, Workload]) -> None: ...


@dataclass(frozen=True)
class Step:
    name: str
    do: Callable[[], Awaitable[None]]
    undo: Callable[[], Awaitable[None]]


async def run_steps(what: str, steps: Sequence[Step]) -> None:
    """Run `steps` in order; on a failure undo the started ones in reverse and raise."""
    started: list[Step] = []
    for step in steps:
        started.append(step)
        try:
            await step.do()
        except Exception as exc:
            failed_undo = []
            for done in reversed(started):
                try:
                    await done.undo()
                except Exception as undo_exc:
                    log.exception("%s: undoing %s failed", what, done.name)
                    failed_undo.append(f"{done.name}: {undo_exc}")
            message = f"{what} failed at {step.name}: {exc}; rolled back"
            if failed_undo:
                message += f" (but undoing {'; '.join(failed_undo)} failed too)"
            raise EnrollmentError(message) from exc


@dataclass(frozen=True)
class Enrolled:
    workload: Workload
    proxies: int  # how many proxies acked it
    elapsed: float  # seconds, from request to published


class Enrollment:
    def __init__(
        self,
        store: EnrollmentStore,
        proxies: Proxies,
        certificates: Certificates,
        backend: RedirectionBackend,
        directory: DirectoryPublisher,
        mesh: MeshConfig,
        addresses: Callable[[Path], tuple[str, ...]],
        resolve: Callable[[str], tuple[Path, NetnsId]] = resolve_netns,
        forbidden: Callable[[], Mapping[NetnsId, str]] = host_namespaces,
    ) -> None:
        self.store = store
        self.proxies = proxies
        self.certificates = certificates
        self.backend = backend
        self.directory = directory
        self.mesh = mesh
        self.addresses = addresses
        self.resolve = resolve
        self.forbidden = forbidden
        self.enrollments: Enrollments = {}

    def mode(self, workload: Workload) -> Mode:
        return self.mesh.mode_for(workload.namespace, workload.mode)

    async def enroll(
        self,
        netns: str,
        namespace: str,
        service_account: str,
        mode: str | None = None,
        labels: Mapping[str, str] | None = None,
        name: str | None = None,
        ips: tuple[str, ...] = (),
    ) -> Enrolled:
        """Enroll the namespace `netns` (a name or a path) as namespace/service_account, with
        `labels` for policy selectors; `name` is what status shows (default: the path's last
        part; the CNI plugin gives the pod's name), `ips` its addresses when the caller knows
        them (the CNI plugin: from prevResult; default: read in the namespace)."""
        started = time.monotonic()
        check_request(namespace, service_account, mode, labels)
        path, netns_id = self.resolve(netns)
        workload = new_workload(path, netns_id, namespace, service_account, mode, labels)
        if name:
            workload = replace(workload, name=name)
        plan = plan_enroll(self.enrollments, workload, self.forbidden())
        for stale in plan.stale:
            await self.forget(stale, f"a new network namespace is enrolled at {stale.netns}")
        if not ips:
            ips = await asyncio.to_thread(self.addresses, path)
        workload = replace(workload, ips=ips)
        before = dict(self.enrollments)
        after = {**before, workload.uid: workload}
        acked = 0

        async def add() -> None:
            nonlocal acked
            acked = await self.proxies.add_workload(workload, self.mode(workload))

        steps = [
            self._persist(after, before),
            Step("proxies", add, lambda: self._del(workload)),
            Step(
                "certificate",
                lambda: self._send_certificate(workload),
                lambda: self._forget(workload),
            ),
            Step("redirection", lambda: self._apply(path), lambda: self._remove(path)),
            self._publish(after, before),
        ]
        await run_steps(f"enrolling {workload.describe()}", steps)
        elapsed = time.monotonic() - started
        log.info(
            "enrolled %s as %s/%s (uid %s) in %.1f ms (%d proxy ack(s))",
            workload.name,
            workload.namespace,
            workload.service_account,
            workload.uid,
            elapsed * 1e3,
            acked,
        )
        return Enrolled(workload, acked, elapsed)

    async def relabel(self, workload: Workload, labels: Mapping[str, str]) -> Workload:
        """Give an enrolled workload new `labels`, in place (see the module doc)."""
        checked = check_request(workload.namespace, workload.service_account, None, labels)
        relabelled = replace(workload, labels=checked)
        if relabelled == workload:
            return workload
        before = dict(self.enrollments)
        after = {**before, workload.uid: relabelled}

        async def send(w: Workload) -> None:
            await self.proxies.add_workload(w, self.mode(w))

        steps = [
            self._persist(after, before),
            Step("proxies", lambda: send(relabelled), lambda: send(workload)),
        ]
        await run_steps(f"relabelling {workload.describe()}", steps)
        log.info("relabelled %s: %s", workload.name,
                 ",".join(f"{k}={v}" for k, v in checked) or "no labels")  # fmt: skip
        return relabelled

    def _lookup(self, name_or_path: str) -> tuple[Workload, Path | None, NetnsId | None]:
        """The enrollment `name_or_path` means (`find_enrollment`), with the namespace it
        reaches now (path and identity; None when it reaches none)."""
        try:
            path, live = self.resolve(name_or_path)
        except NetnsError:
            path, live = None, None
        return find_enrollment(self.enrollments, name_or_path, live), path, live

    def find(self, name_or_path: str) -> Workload:
        """The enrolled workload `name_or_path` names, or `EnrollmentError`."""
        return self._lookup(name_or_path)[0]

    async def unenroll(self, name_or_path: str) -> Workload:
        """Unenroll what `name_or_path` reaches now, or the record of that name (gone netns)."""
        workload, path, live = self._lookup(name_or_path)
        await self._leave(workload, reach(workload, path, live), "unenrolling")
        log.info("unenrolled %s (uid %s)", workload.name, workload.uid)
        return workload

    async def unenroll_workload(self, workload: Workload) -> None:
        """Unenroll an enrolled workload known by its record (the CNI plugin's DEL knows its
        sandbox, not a name): its redirection is removed if its namespace is still reachable."""
        await self._leave(workload, reach(workload, None, None), "unenrolling")
        log.info("unenrolled %s (uid %s)", workload.name, workload.uid)

    async def forget(self, workload: Workload, reason: str) -> None:
        """Drop a workload whose namespace is gone (nothing to remove in it)."""
        await self._leave(workload, None, "forgetting")
        log.info("forgot %s (uid %s): %s", workload.name, workload.uid, reason)

    async def _leave(self, workload: Workload, netns: Path | None, what: str) -> None:
        """Unenroll `workload`; `netns` reaches its namespace (None: gone, no rules to remove)."""
        before = dict(self.enrollments)
        after = without(before, workload.uid)

        async def readd() -> None:
            if netns is not None:
                await self.proxies.add_workload(workload, self.mode(workload))
                await self._send_certificate(workload)

        steps = [self._persist(after, before)]
        if netns is not None:
            steps.append(
                Step("redirection", lambda: self._remove(netns), lambda: self._apply(netns))
            )
        steps += [
            Step("proxies", lambda: self._del(workload), readd),
            Step("certificate", lambda: self._forget(workload), lambda: self._reissue(workload)),
            self._publish(after, before),
        ]
        await run_steps(f"{what} {workload.describe()}", steps)

    # ------------------------------------------------------------------ steps
    def _persist(self, new: Enrollments, old: Enrollments) -> Step:
        def write(enrollments: Enrollments) -> None:
            with self.store.locked():
                self.store.save(enrollments)

        async def save(enrollments: Enrollments) -> None:
            await asyncio.to_thread(write, enrollments)  # flock and fsync: off the loop
            self.enrollments = enrollments

        async def restore() -> None:
            self.enrollments = old
            await save(old)

        return Step("persist", lambda: save(new), restore)

    def _publish(self, new: Enrollments, old: Enrollments) -> Step:
        return Step(
            "directory", lambda: self.directory.publish(new), lambda: self.directory.publish(old)
        )

    async def _del(self, workload: Workload) -> None:
        await self.proxies.del_workload(workload.uid)

    async def _send_certificate(self, workload: Workload) -> None:
        certificate = self.certificates.issue(workload)
        if certificate is not None:
            await self.proxies.send_certificate(certificate)

    async def _reissue(self, workload: Workload) -> None:
        self.certificates.issue(workload)

    async def _forget(self, workload: Workload) -> None:
        self.certificates.forget(workload.uid)

    async def _apply(self, path: Path) -> None:
        await asyncio.to_thread(self.backend.apply, path)

    async def _remove(self, path: Path) -> None:
        await asyncio.to_thread(self.backend.remove, path)
