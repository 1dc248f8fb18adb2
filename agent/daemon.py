"""`agent run`: the node agent (control plane of one node): its parts, wired, and its life.

The parts, one concern each:

- `enrollment.Enrollment`: the one path that enrolls and unenrolls workloads (admin requests and
  the config's declared workloads alike), step by step with rollback;
- `proxy_hub.ProxyHub`: the connected proxies (snapshot on connect, acked broadcasts);
- `certificates.Certificates`: workload certificates, minted, renewed at half-life, forgotten;
- `publishing.Publisher`: this node's entries in the shared mesh directory, and the merged view;
- `policy_store.PolicyStore`: the policy in force, followed from its source
  (`policy_source.DirectorySource`: `policy.directory`, watched with inotify), JWKS inlined,
  versioned and pushed to every proxy (and into every snapshot);
- the redirection backend (`redirection.backend` or `agent run --backend`, chosen by
  `redirect.select`: iptables, nftables, or `auto`), behind `redirect.backend.RedirectionBackend`,
  whose kernel work runs on a dedicated netns thread.  It takes every enrolled pod over from the
  other backends (`redirect.backend.SoleRedirection`): after a switch, the first reconcile finds
  the old backend's rules as drift and replaces them;
- `redirect.watch.LossWatch`: samples every enrolled pod twice a second with a few syscalls and
  repairs lost redirection (a flushed ruleset, detached programs) within a second, between
  reconciles, which stay the backstop.

The CNI plugin's requests (`<state-dir>/cni.sock`: a pod sandbox's ADD, DEL and CHECK) are served
by `cni_service.CniService`, which asks a `cni_enroll.PodDecider` (`Agent(decider=...)`; the
standalone one enrolls every pod it is told about) and enrolls through the same path, under the
same lock.

This module wires them, serves the admin socket (`agent.sock`: enroll, unenroll, status,
reconcile, policy_check; every request gets an answer, also when it fails unexpectedly) and runs
six loops: accepting proxies, the loss watch, reconciling (observe every workload without the
lock, decide purely with `reconcile.plan_reconcile`, act under the lock: forget namespaces that
disappeared, repair drifted rules, enroll declared workloads whose namespace appeared), identity
(renew certificates, follow the shared directory), policy (reload on every change of the
source) and JWKS (refetch the keys of `jwksUri` rules when due).  The policy in force is restored
and loaded before the first proxy is accepted, so no snapshot carries less than the last good
policy.  Every change of state happens under one lock (`state_lock`), so requests, reconcile
actions, policy versions and proxy snapshots never interleave.  The agent holds
`<state-dir>/agent.lock` for its whole life, which is how the CLI knows that it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.admin import (
    AGENT_SOCKET,
    AgentRunning,
    Reply,
    hold_agent_lock,
    prepare_state_dir,
    serve_async,
)
from agent.agent_session import Snapshot
from agent.certificates import Certificates
from agent.cni_enroll import PodDecider, StandaloneDecider
from agent.cni_protocol import SOCKET_NAME as CNI_SOCKET
from agent.cni_service import CniService
from agent.config import Config, ConfigError, WorkloadSpec, node_name_of, parse_address
from agent.control.channel import CONTROL_SOCKET
from agent.enrollment import Enrollment
from agent.identity.spiffe import IdentityError
from agent.jwks_fetch import JwksKeys
from agent.netns import NetnsError, NetnsExecutor, pod_addresses
from agent.netns_id import current_id
from agent.policy_check import CheckRequest
from agent.policy_source import DirectorySource, PolicySource
from agent.policy_store import PolicyStore
from agent.proxy_hub import ProxyHub
from agent.publishing import Publisher
from agent.reconcile import (
    EnrollDeclared,
    Forget,
    Observation,
    ReconcileAction,
    Repair,
    describe,
    plan_reconcile,
)
from agent.redirect.backend import RedirectionBackend
from agent.redirect.probes import ProbeSnat
from agent.redirect.watch import LossWatch
from agent.status import read_back
from agent.telemetry import agent_metrics
from agent.telemetry.agent_metrics import AgentCollector, AgentTelemetry
from agent.workloads import Enrollments, EnrollmentStore, StoreError, Workload

if TYPE_CHECKING:
    from agent.kube.client import KubeClient
    from agent.kube.controller import KubeController

log = logging.getLogger("ferry.agent")


class Agent:
    def __init__(
        self,
        config: Config,
        state_dir: Path,
        backend: RedirectionBackend | None = None,
        decider: PodDecider | None = None,
        backend_origin: str = "redirection.backend",
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.started_at = time.time()
        self.last_reconcile: dict[str, Any] = {}
        self.telemetry = AgentTelemetry()  # agent.metrics_address: /metrics, /healthz, /readyz
        self.state_lock = asyncio.Lock()
        self.executor = NetnsExecutor()
        self.backend_choice = (
            config.redirection.backend,
            f"{backend_origin} is {config.redirection.backend}",
        )
        if backend is None:
            from agent.redirect.select import make_backend, select_backend

            choice = select_backend(config.redirection, backend_origin)
            self.backend_choice = (choice.backend, choice.reason)
            backend = make_backend(choice, config.redirection, self.executor, state_dir)
        self.backend = backend
        self.loss_watch = LossWatch(self.backend_choice[0], backend, config.redirection,
                                    self.executor, self.state_lock,
                                    config.agent.loss_watch_interval)  # fmt: skip
        self.certificates = Certificates(config.identity, state_dir)
        self.hub = ProxyHub(self._snapshot, self.state_lock)
        self.publisher = Publisher(config, state_dir, self.hub)
        self.store = EnrollmentStore(state_dir)
        source: PolicySource = DirectorySource(Path(config.policy.directory))
        kube: KubeClient | None = None
        if config.kubernetes.enabled:  # lightkube is loaded only then
            from agent.kube.client import KubeClient, connect
            from agent.kube.policy_source import KubernetesSource

            kube = KubeClient(connect(config.kubernetes.kubeconfig), node_name_of(config),
                              config.kubernetes.policies)  # fmt: skip
            if config.kubernetes.policies:
                source = KubernetesSource(kube.policies)
        self.policy = PolicyStore(
            source,
            self.hub,
            self.state_lock,
            config.policy,
            config.identity.trust_domain,
            state_dir,
            JwksKeys(config.policy.jwks_refresh),
        )
        self.enrollment = Enrollment(
            self.store,
            self.hub,
            self.certificates,
            backend,
            ProbeSnat(
                self.publisher,
                self.executor,
                config.kubernetes.enabled and config.kubernetes.probe_snat,
                config.redirection.ipv6,
            ),
            config.mesh,
            self._addresses,
        )
        self.kube: KubeController | None = None
        if kube is not None:
            from agent.kube.controller import KubeController, KubernetesDecider

            self.kube = KubeController(config.kubernetes, node_name_of(config), kube,
                                       self.enrollment, self.state_lock)  # fmt: skip
            decider = decider or KubernetesDecider(self.kube)
            self.certificates.find_pod = self.kube.pod_running_as  # identity.ca_url asks for it
        self.cni = CniService(
            self.enrollment, self.state_lock, backend, decider or StandaloneDecider(), state_dir
        )
        self._stop = asyncio.Event()

    @property
    def enrollments(self) -> Enrollments:
        return self.enrollment.enrollments

    def _addresses(self, netns: Path) -> tuple[str, ...]:
        return self.executor.call(netns, pod_addresses)

    def _snapshot(self) -> Snapshot:
        """Everything a (re)connecting proxy must hold (called under `state_lock`)."""
        workloads = list(self.enrollments.values())
        certificates = [self.certificates.issue_or_keep(w) for w in workloads]
        return Snapshot(
            [(w, self.enrollment.mode(w)) for w in workloads],
            self.certificates.trust(),
            [c for c in certificates if c is not None],
            self.publisher.current.full(),
            self.policy.chunks(),
        )

    # ------------------------------------------------------------------ admin
    async def handle(self, body: dict[str, Any]) -> Reply:
        op = body.get("op")
        try:
            if op == "enroll":
                mode = body.get("mode")
                labels = body.get("labels") or {}
                if not isinstance(labels, dict):
                    raise ValueError(f"labels must be an object of key: value, got {labels!r:.80}")
                async with self.state_lock:
                    done = await self.enrollment.enroll(
                        str(body.get("netns", "")),
                        str(body.get("namespace", "")),
                        str(body.get("service_account", "")),
                        None if mode is None else str(mode),
                        labels,
                    )
                self.telemetry.enrolled(done.elapsed)
                return {
                    "ok": True,
                    "workload": done.workload.to_json(),
                    "proxies": done.proxies,
                    "elapsed_ms": round(done.elapsed * 1e3, 2),
                }
            if op == "unenroll":
                async with self.state_lock:
                    gone = await self.enrollment.unenroll(str(body.get("netns", "")))
                return {"ok": True, "workload": gone.to_json()}
            if op == "reconcile":
                return {"ok": True, "actions": await self.reconcile()}
            if op == "status":
                return await self.status(readback=bool(body.get("readback")))
            if op == "policy_check":
                request = CheckRequest.from_json(body)
                workload = await asyncio.to_thread(self.enrollment.find, str(body.get("netns", "")))
                return {"ok": True, **self.policy.check(workload, request)}
        except ValueError as exc:  # a refusal (EnrollmentError, NetnsError): its message says why
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("admin request %r failed", op)
            return {"ok": False, "error": f"{op} failed: {type(exc).__name__}: {exc}"}
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def status(self, readback: bool = False) -> Reply:
        reply: Reply = {
            "ok": True,
            "version": __version__,
            "pid": os.getpid(),
            "node": self.config.node_name,
            "backend": self.backend_choice[0],
            "backend_reason": self.backend_choice[1],
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "proxies": self.hub.status(),
            "workloads": sorted(self.enrollments),
            "last_reconcile": self.last_reconcile,
            "loss_watch": self.loss_watch.counts.to_json(),
            "identity": self.certificates.status(),
            "modes": {uid: self.enrollment.mode(w) for uid, w in self.enrollments.items()},
            "directory": self.publisher.status(),
            "policy": self.policy.status(self.enrollments),
            "kubernetes": self.kube.status() if self.kube is not None else None,
        }
        if readback:  # the kernel's view, read now, for `agent status`
            workloads = dict(self.enrollments)
            reply["readback"] = await asyncio.to_thread(
                lambda: {
                    uid: read_back(w, self.backend, self.executor) for uid, w in workloads.items()
                }
            )
        return reply

    # -------------------------------------------------------------- reconcile
    def _observe(self, workload: Workload) -> Observation:
        now = current_id(workload.netns)
        if now != workload.netns_id:
            return Observation(now, "unknown")
        report = self.backend.inspect(Path(workload.netns))
        return Observation(now, report.state, report.missing + report.unexpected)

    def _declared(self) -> dict[str, WorkloadSpec]:
        """The declared workloads whose namespace exists now, by the uid it would get."""
        declared: dict[str, WorkloadSpec] = {}
        for spec in self.config.workloads:
            try:
                _path, netns = self.enrollment.resolve(spec.netns)
            except NetnsError:
                continue
            declared.setdefault(netns.uid, spec)
        return declared

    async def reconcile(self) -> list[str]:
        """Observe every workload (one at a time, without holding the lock, so an enrollment
        waits for at most one read-back), then act under the lock on what is still the same."""
        snapshot = dict(self.enrollments)
        observed = {
            uid: await asyncio.to_thread(self._observe, workload)
            for uid, workload in snapshot.items()
        }
        declared = await asyncio.to_thread(self._declared)
        async with self.state_lock:
            current = self.enrollments
            unchanged = {uid: w for uid, w in current.items() if snapshot.get(uid) == w}
            fresh = {uid: spec for uid, spec in declared.items() if uid not in current}
            actions = plan_reconcile(unchanged, observed, fresh)
            done = [await self._perform(action) for action in actions]
        self.telemetry.reconciled(observed, actions, done)
        self.last_reconcile = {"at": time.time(), "actions": done}
        for line in done:
            log.info("reconcile: %s", line)
        return done

    async def _perform(self, action: ReconcileAction) -> str:
        try:
            match action:
                case Forget(workload=w, reason=reason):
                    await self.enrollment.forget(w, reason)
                case Repair(workload=w):
                    await asyncio.to_thread(self.backend.apply, Path(w.netns))
                case EnrollDeclared(spec=spec):
                    await self.enrollment.enroll(
                        spec.netns,
                        spec.namespace,
                        spec.service_account,
                        labels=dict(spec.labels),
                    )
        except Exception as exc:  # retried on the next tick
            log.error("reconcile: %s failed: %s", describe(action), exc)
            return f"FAILED: {describe(action)}: {exc}"
        return describe(action)

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # e.g. a netns vanished mid-check: the next tick sees it gone
                log.exception("reconcile failed")
            await asyncio.sleep(self.config.agent.reconcile_interval)

    # --------------------------------------------------------------- identity
    async def _identity_forever(self) -> None:
        """Renew certificates at half-life and follow the shared directory, once a second."""
        while True:
            await asyncio.sleep(1.0)
            try:
                async with self.state_lock:
                    now = dt.datetime.now(dt.UTC)
                    for workload in self.certificates.due(self.enrollments.values(), now):
                        renewed = self.certificates.renew(workload, now)
                        if renewed is not None:
                            await self.hub.send_certificate(renewed)
                    await self.publisher.refresh(self.enrollments)
            except Exception:  # retried on the next tick; the agent keeps running
                log.exception("certificate renewal / directory refresh failed")

    # -------------------------------------------------------------------- run
    async def _load(self) -> None:
        """Load the store; workloads recorded while the agent was down get their addresses."""
        with self.store.locked():
            loaded = self.store.load()
        for uid, workload in list(loaded.items()):
            if workload.ips:
                continue
            try:
                ips = await asyncio.to_thread(self._addresses, Path(workload.netns))
            except (OSError, NetnsError):
                continue  # gone: the first reconcile forgets it
            loaded[uid] = replace(workload, ips=ips)
        with self.store.locked():
            self.store.save(loaded)
        self.enrollment.enrollments = loaded

    def _watches(self) -> list[Any]:
        return [r.health for r in self.kube.client.reflectors] if self.kube is not None else []

    def _policy_rejected(self) -> bool:
        return self.policy.status(self.enrollments).get("rejected") is not None

    async def run(self) -> None:
        prepare_state_dir(self.state_dir)
        lock = hold_agent_lock(self.state_dir)
        try:
            await self._serve()
        finally:
            os.close(lock)

    async def _serve(self) -> None:
        node_name_of(self.config)
        self.certificates.load()
        await self._load()
        await self.enrollment.directory.publish(self.enrollments)  # and the probe SNAT
        self.policy.restore()
        self.policy.source.start()
        try:
            await self.policy.load()
        except Exception:  # the policy task retries on the next change or rescan
            log.exception("policy: the first load failed; version %d stays in force",
                          self.policy.current.version)  # fmt: skip
        admin = await serve_async(self.state_dir / AGENT_SOCKET, self.handle)
        cni = await self.cni.serve(self.state_dir / CNI_SOCKET)
        control = self.hub.listen(self.state_dir)
        endpoints = agent_metrics.serve(
            parse_address("agent.metrics_address", self.config.agent.metrics_address),
            AgentCollector(self.telemetry, self._watches, self._policy_rejected),
            asyncio.get_running_loop(),
            lambda: "" if self.telemetry.reconcile_runs else "the first reconcile is not done",
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        tasks = [
            asyncio.create_task(self.hub.accept_forever(control), name="accept-proxies"),
            asyncio.create_task(self._reconcile_forever(), name="reconcile"),
            asyncio.create_task(self._identity_forever(), name="identity"),
            asyncio.create_task(self.policy.follow(), name="policy"),
            asyncio.create_task(self.policy.jwks_forever(), name="jwks"),
        ]
        if self.kube is not None:
            tasks.append(asyncio.create_task(self.kube.run(), name="kubernetes"))
        if self.config.agent.loss_watch_interval:  # 0: the reconcile repairs alone
            watch = self.loss_watch.run(lambda: self.enrollments)
            tasks.append(asyncio.create_task(watch, name="loss-watch"))
        log.info(
            "agent %s on node %s: state dir %s, %d enrolled workload(s), backend %s (%s)",
            __version__,
            self.config.node_name,
            self.state_dir,
            len(self.enrollments),
            *self.backend_choice,
        )
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in [stop, *tasks]:
            task.cancel()
        for task in done:
            if task is not stop and not task.cancelled() and task.exception():
                log.error("agent task %s died: %s", task.get_name(), task.exception())
        admin.close()
        cni.close()
        if endpoints is not None:
            endpoints.shutdown()
            endpoints.server_close()
        control.close()
        self.hub.close()
        self.policy.source.close()
        if self.kube is not None:
            await self.kube.client.close()
        for name in (AGENT_SOCKET, CNI_SOCKET, CONTROL_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()
        self.loss_watch.close()
        self.executor.shutdown()
        log.info("agent stopped; redirection stays in place (fail closed while no proxy runs)")


def run_agent(config: Config, state_dir: Path, backend_origin: str = "redirection.backend") -> None:
    """`agent run`; `backend_origin` names what set the backend (for `agent status`)."""
    try:
        asyncio.run(Agent(config, state_dir, backend_origin=backend_origin).run())
    except IdentityError as exc:
        raise SystemExit(f"agent: node credentials are unusable: {exc}") from exc
    except (AgentRunning, ConfigError, StoreError, OSError) as exc:
        raise SystemExit(f"agent: {exc}") from exc
