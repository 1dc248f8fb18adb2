"""The agent's side of the CNI plugin: `<state-dir>/cni.sock`, and ADD / DEL / CHECK on pods.

`CniService.serve` listens on a unix socket created 0600 in the 0700 state dir (only root on the
node can reach it).  Each connection carries one invocation of `ferry-cni` (framing in
`agent.cni_protocol`): the request is read to EOF (at most `MAX_INVOCATION` bytes), parsed
purely, handled, and answered with the plugin's exit code and stdout.  Every request is
answered, a failure included, so the plugin never mistakes a refusal for a missing agent.

- ADD: the pod (`agent.cni_enroll.PodRef`) is skipped when its namespace is excluded, else the
  decider is asked (waiting at most `decision_wait` seconds).  `Enroll` enrolls it through the
  agent's one enrollment path (`agent.enrollment`: proxies, certificate, redirection in its
  netns, directory) under the agent's state lock, and only then answers: prevResult unchanged.
  An enrollment that fails (it is rolled back) fails the ADD with CNI error 100, an undecided
  pod with 11 ("try again later"), so the runtime starts no app container unprotected.  A
  repeated ADD of a sandbox whose netns is already enrolled succeeds without change.
- DEL: the workload of the sandbox (found by container id in `cni-sandboxes.json`, else by its
  netns) is unenrolled.  DEL never fails: a sandbox that is unknown or already gone is fine, and
  a removal that fails is logged and left to reconcile, which forgets workloads whose netns is
  gone.
- CHECK: a pod that must be enrolled must be, with its redirection read back from the kernel as
  in place (`RedirectionBackend.inspect`); otherwise CNI error 101 says what is missing.

The container id -> workload uid map persists in the state dir (0600, written and renamed), so a
DEL after an agent restart still finds the pod's workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path

from agent.cni_enroll import (
    Decision,
    Enroll,
    PodDecider,
    PodRef,
    Skip,
    Undecided,
    excluded,
    pod_ref,
    workload_name,
)
from agent.cni_protocol import (
    ENROLLMENT_FAILED,
    MAX_INVOCATION,
    NOT_PROTECTED,
    TRY_AGAIN_LATER,
    CniError,
    Invocation,
    error_reply,
    ok_reply,
    parse_invocation,
)
from agent.enrollment import Enrollment
from agent.netns import NetnsError
from agent.redirect.backend import RedirectionBackend

log = logging.getLogger("ferry.cni")

SANDBOXES = "cni-sandboxes.json"
DECISION_WAIT = 5.0  # seconds a decider may wait for what it lacks (the pod watcher)


class Sandboxes:
    """Container id -> workload uid of the pods enrolled through the CNI plugin (persisted)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SANDBOXES
        self.entries: dict[str, str] = {}

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            entries = raw["sandboxes"]
            self.entries = {str(k): str(v) for k, v in entries.items()}
        except FileNotFoundError:
            self.entries = {}
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            log.error("ignoring unreadable %s: %s", self.path, exc)
            self.entries = {}

    def save(self, live: set[str]) -> None:
        """Write the map, keeping only entries whose workload is still enrolled."""
        self.entries = {k: v for k, v in self.entries.items() if v in live}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": 1, "sandboxes": self.entries}, handle)
        os.replace(tmp, self.path)


class CniService:
    def __init__(
        self,
        enrollment: Enrollment,
        lock: asyncio.Lock,
        backend: RedirectionBackend,
        decider: PodDecider,
        state_dir: Path,
        decision_wait: float = DECISION_WAIT,
    ) -> None:
        self.enrollment = enrollment
        self.lock = lock
        self.backend = backend
        self.decider = decider
        self.decision_wait = decision_wait
        self.sandboxes = Sandboxes(state_dir)
        self.sandboxes.load()

    async def serve(self, path: Path) -> asyncio.AbstractServer:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        server = await asyncio.start_unix_server(self._on_client, path=str(path))
        os.chmod(path, 0o600)
        return server

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = bytearray()
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > MAX_INVOCATION:
                    break
            writer.write(await self.handle(bytes(data)))
            await writer.drain()
        except ConnectionError:  # the plugin gave up (its timeout): nothing to answer
            log.warning("the CNI plugin closed its connection before the answer")
        finally:
            writer.close()

    async def handle(self, data: bytes) -> bytes:
        """One invocation in, the plugin's reply frame out (never raises)."""
        started = time.monotonic()
        try:
            invocation = parse_invocation(data)
        except CniError as exc:
            log.warning("CNI plugin sent an invalid invocation: %s", exc)
            return error_reply(exc.code, exc.message, exc.details)
        try:
            if invocation.command == "ADD":
                await self._add(invocation)
            elif invocation.command == "DEL":
                await self._del(invocation)
            else:
                await self._check(invocation)
        except CniError as exc:
            log.warning("CNI %s of %s failed: %s", invocation.command, invocation.container_id,
                        exc)  # fmt: skip
            return error_reply(exc.code, exc.message, exc.details, invocation.cni_version)
        except Exception as exc:
            log.exception("CNI %s of %s failed", invocation.command, invocation.container_id)
            return error_reply(
                ENROLLMENT_FAILED,
                f"Ferry failed on {invocation.command}",
                f"{type(exc).__name__}: {exc}",
                invocation.cni_version,
            )
        log.info("CNI %s of %s answered in %.1f ms", invocation.command,
                 pod_ref(invocation).describe(), (time.monotonic() - started) * 1e3)  # fmt: skip
        return ok_reply(invocation)

    async def _decide(self, pod: PodRef) -> Decision:
        skip = excluded(pod)
        if skip is not None:
            return skip
        try:
            async with asyncio.timeout(self.decision_wait + 1.0):
                return await self.decider.decide(pod, self.decision_wait)
        except TimeoutError:
            return Undecided(f"the decider did not answer within {self.decision_wait + 1.0} s")

    def _enrolled_uid(self, netns: str) -> str | None:
        """The uid of the workload enrolled for the namespace at `netns` now, if any."""
        try:
            _path, netns_id = self.enrollment.resolve(netns)
        except NetnsError:
            return None
        return netns_id.uid if netns_id.uid in self.enrollment.enrollments else None

    async def _add(self, invocation: Invocation) -> None:
        pod = pod_ref(invocation)
        decision = await self._decide(pod)
        if isinstance(decision, Skip):
            log.info("CNI ADD %s: not enrolled: %s", pod.describe(), decision.reason)
            return
        if isinstance(decision, Undecided):
            raise CniError(
                TRY_AGAIN_LATER,
                f"pod {pod.describe()} not started: Ferry cannot tell yet whether to enroll it",
                decision.reason,
            )
        await self._enroll(pod, decision)

    async def _enroll(self, pod: PodRef, decision: Enroll) -> None:
        async with self.lock:
            uid = self._enrolled_uid(pod.netns)
            if uid is None:
                try:
                    done = await self.enrollment.enroll(
                        pod.netns,
                        decision.namespace,
                        decision.service_account,
                        decision.mode,
                        decision.labels,
                        name=workload_name(pod),
                        ips=tuple(sorted(pod.ips)),
                    )
                except ValueError as exc:  # EnrollmentError, NetnsError: rolled back
                    raise CniError(
                        ENROLLMENT_FAILED,
                        f"pod {pod.describe()} not started: enrolling it in Ferry failed",
                        str(exc),
                    ) from None
                uid = done.workload.uid
            self.sandboxes.entries[pod.container_id] = uid
            await asyncio.to_thread(self.sandboxes.save, set(self.enrollment.enrollments))

    async def _del(self, invocation: Invocation) -> None:
        async with self.lock:
            uid = self.sandboxes.entries.pop(invocation.container_id, None)
            if uid is None and invocation.netns:
                uid = self._enrolled_uid(invocation.netns)
            workload = self.enrollment.enrollments.get(uid) if uid else None
            if workload is not None:
                try:
                    await self.enrollment.unenroll_workload(workload)
                except Exception:  # DEL never fails; reconcile forgets it once its netns is gone
                    log.exception("CNI DEL of %s: unenrolling %s failed",
                                  invocation.container_id, workload.describe())  # fmt: skip
            await asyncio.to_thread(self.sandboxes.save, set(self.enrollment.enrollments))

    async def _check(self, invocation: Invocation) -> None:
        pod = pod_ref(invocation)
        decision = await self._decide(pod)
        if isinstance(decision, Skip):
            return
        if isinstance(decision, Undecided):
            raise CniError(
                TRY_AGAIN_LATER,
                f"cannot check pod {pod.describe()}: Ferry cannot tell whether to enroll it",
                decision.reason,
            )
        uid = self._enrolled_uid(pod.netns)
        workload = self.enrollment.enrollments.get(uid) if uid else None
        if workload is None:
            raise CniError(
                NOT_PROTECTED,
                f"pod {pod.describe()} must be enrolled in Ferry and is not",
                f"no enrollment for network namespace {pod.netns}",
            )
        report = await asyncio.to_thread(self.backend.inspect, Path(workload.netns))
        if report.state != "ok":
            differences = "; ".join([*report.missing, *report.unexpected][:5])
            raise CniError(
                NOT_PROTECTED,
                f"pod {pod.describe()}: its Ferry redirection is {report.state}",
                differences or f"read back from {workload.netns}",
            )
