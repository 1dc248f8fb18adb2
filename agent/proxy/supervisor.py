"""`agent proxy`: the per-node proxy's supervisor process.

The supervisor never touches payload.  It:
- connects to the agent's `control.sock` (retrying with backoff, 10 ms doubling to 2 s; the
  backoff is reset only once a snapshot was applied, so a proxy that cannot take the agent's
  snapshot does not reconnect in a tight loop), says hello, and applies what the agent sends
  through `ProxySession`: for each workload it opens the in-pod listeners once
  (`sockets.open_listeners`, inside the pod's netns) and hands the netns fd and the listener fds
  to every worker; a snapshot drops what the agent no longer holds;
- runs N worker processes (`agent.proxy.workers.WorkerPool`), each with its own epoll loop over
  the *same* listening sockets (EPOLLEXCLUSIVE), so N cores share the work without N copies of
  any pod's listeners; a worker that dies is restarted and given everything again (`_state`);
- forwards every change to every worker as typed messages (`agent.proxy.messages`) and waits for
  each worker's `Done`, so the agent's ack carries any worker's failure (a workload a worker
  could not take is removed again everywhere, and the agent rolls its enrollment back);
- keeps the mesh directory (`agent.directory.DirectoryTable`) to give a restarted worker, and
  forwards directory chunks as they come;
- aggregates the workers' counters for Prometheus (`127.0.0.1:15020/metrics` by default,
  `agent.proxy.metrics`; /healthz and /readyz there too, `agent.telemetry.endpoints`), forwards
  SIGHUP to the workers (they reopen their access log) and answers `agent status` on
  `<state-dir>/proxy.sock`, including what
  every worker has applied (directory version and size, certificates) so that status can compare
  it with what the agent sent.

When the agent goes away the proxy keeps serving what it has; when the proxy goes away its
listeners close with it and redirected connections are refused (fail closed).

Upgrades (`agent.proxy.handoff`, `agent.proxy.takeover`): a proxy that starts while another runs
on the state dir takes over from it without dropping a connection.  It starts its workers, takes
the running proxy's listeners (which then stops taking agent messages), connects to the agent for
a snapshot and serves each workload with the listeners it inherited (`open_listeners(...,
inherited)`: the same sockets, so both proxies accept for a moment), and once every worker is up
it says `serving`; the old one stops accepting (`Drain` to its workers), closes its metrics,
proxy.sock and handoff.sock, and drains: it exits when its workers have (each when its last
connection ended) or at `proxy.drain_timeout`, ignoring SIGTERM meanwhile (with
`proxy.exit_after_drain: false`, as in a pod, it then stays idle, holding nothing, until
SIGTERM: a container that exits is restarted and would take the listeners back).  Only then does the
new one bind metrics, proxy.sock and handoff.sock, and tell systemd it is the main process.  If
the new one cannot finish (no snapshot within `proxy.handoff_timeout`, a worker that will not
start, a crash), the old one takes the agent link back and never stopped serving; the new one
drains what it accepted meanwhile and exits 1 (rollback).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client.core import CollectorRegistry

from agent import __version__
from agent.admin import PROXY_SOCKET, Reply, prepare_state_dir, serve_thread
from agent.config import Config, parse_address
from agent.control.channel import CONTROL_SOCKET, ChannelClosed, recv_message, send_message
from agent.control.protocol import (
    Ack,
    Add,
    DirectoryChunk,
    Hello,
    Message,
    PolicyChunk,
    ProtocolError,
    ProxySession,
    Remove,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
)
from agent.directory import DirectoryError, DirectoryTable, DirectoryUpdate
from agent.proxy.handoff import HANDOFF_SOCKET
from agent.proxy.messages import (
    AddWorkload,
    Drain,
    ListenerSpec,
    Mode,
    Relabel,
    RemoveWorkload,
    SetCertificate,
    SetTrust,
    ToWorker,
    UpdateDirectory,
    UpdatePolicy,
)
from agent.proxy.metrics import (
    Labelled,
    MetricsCollector,
    sum_decisions,
    sum_flows,
    sum_shed,
    totals,
    tunnel_totals,
)
from agent.proxy.policy_state import PolicyRejected, PolicyState
from agent.proxy.ratelimit_store import SharedBuckets
from agent.proxy.sockets import Listener, open_listeners
from agent.proxy.takeover import (
    HandoffFailed,
    HandoffServer,
    Inherited,
    PredecessorLink,
    notify_systemd,
    report,
)
from agent.proxy.workers import MakeMessage, WorkerPool
from agent.redirect import ebpf_listeners
from agent.telemetry import endpoints
from agent.workloads import Workload

log = logging.getLogger("ferry.proxy")
BACKOFF_MIN, BACKOFF_MAX = 0.01, 2.0
WORKER_TIMEOUT = 10.0  # seconds a worker may take to apply one message
BIND_RETRY = 2.0  # seconds to wait for the metrics port a predecessor just let go of
ORPHANED_AFTER = 5.0  # seconds an idle, replaced proxy waits with no proxy on the metrics port


@dataclass
class Served:
    """A workload the proxy serves: its netns fd and the listeners opened in it."""

    workload: Workload
    netns_fd: int
    listeners: list[Listener]
    mode: str = "permissive"
    certificate: WorkloadCertificate | None = None

    def close(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
        os.close(self.netns_fd)


STATE_DIR_ENV = "FERRY_STATE_DIR"  # as `agent.proxy.fastpath` reads it (the CLI's too)


class Supervisor:
    def __init__(self, config: Config, state_dir: Path, workers: int) -> None:
        self.config = config
        self.state_dir = state_dir
        os.environ[STATE_DIR_ENV] = str(state_dir)  # workers find the fast path's map there
        self.worker_count = workers or os.cpu_count() or 1
        self.served: dict[str, Served] = {}
        self.lock = threading.RLock()
        self.agent_connected = False
        self.started_at = time.time()
        self.stopping = threading.Event()
        self.trust: TrustBundle | None = None
        self.directory = DirectoryTable(lookups=False)  # kept to give a new worker
        self.trust_domain = config.identity.trust_domain
        self.policy = PolicyState(config.policy.root_namespace, config.identity.trust_domain)
        self.policy_slices: list[PolicyChunk] = []  # of the version in force, for a new worker
        self._policy_pending: list[PolicyChunk] = []
        self.buckets, buckets_fd = SharedBuckets.create()  # rate limits, exact across workers
        # Workers learn how many they are (limits: each takes an equal share of the node's).
        counted = replace(config, proxy=replace(config.proxy, workers=self.worker_count))
        self.pool = WorkerPool(counted, self.worker_count, buckets_fd, self.lock, self.stopping)
        # upgrades (see the module doc)
        self.inherited: dict[str, Inherited] = {}  # a predecessor's listeners, until adopted
        self.link_allowed = threading.Event()  # cleared: the agent link belongs to a successor
        self.link_allowed.set()
        self.control_sock: socket.socket | None = None
        self.synced = threading.Event()  # an agent snapshot was applied
        self.draining = threading.Event()  # replaced: no longer accepting
        self.idle = threading.Event()  # replaced and drained, staying until SIGTERM
        self.terminated = threading.Event()  # SIGTERM/SIGINT came, maybe while draining
        self.local: LocalServices | None = None
        self.report_fd: int | None = None  # `agent proxy --upgrade` waits for a line there
        self.handing: threading.Thread | None = None  # the handoff to a successor, once replaced

    def _state(self) -> list[tuple[MakeMessage, list[int]]]:
        """Everything a (new) worker needs: trust, directory, policy, workloads and certs."""
        with self.lock:
            messages: list[tuple[MakeMessage, list[int]]] = []
            if self.trust is not None:
                messages.append((self._trust_message(self.trust), []))
            for chunk in self.directory.snapshot():
                messages.append((_directory_message(chunk), []))
            for part in self.policy_slices:
                messages.append((_policy_message(part), []))
            for served in self.served.values():
                messages.append((self._add_message(served), _fds(served)))
                if served.certificate is not None:
                    messages.append((_cert_message(served.certificate), []))
            return messages

    def _add_message(self, served: Served) -> Callable[[int], ToWorker]:
        workload = served.workload
        identity = workload.identity(self.trust_domain)
        specs = tuple(ListenerSpec(lst.direction, lst.family) for lst in served.listeners)
        mode: Mode = "strict" if served.mode == "strict" else "permissive"
        labels = dict(workload.labels)
        return lambda seq: AddWorkload(seq, workload.uid, identity, mode, workload.ips, specs,
                                       workload.namespace, labels)  # fmt: skip

    @staticmethod
    def _trust_message(trust: TrustBundle) -> Callable[[int], ToWorker]:
        return lambda seq: SetTrust(seq, trust.trust_domain, trust.bundle_pem)

    # ------------------------------------------------------------- agent messages
    def set_certificate(self, cert: WorkloadCertificate) -> None:
        with self.lock:
            served = self.served.get(cert.uid)
            if served is None:
                raise ValueError(f"certificate for {cert.uid!r}, which this proxy does not serve")
            if served.certificate == cert:
                return  # a snapshot after a reconnect: the workers have it
            errors = self.pool.to_workers(_cert_message(cert))
            if errors:
                raise ValueError("; ".join(errors))
            served.certificate = cert
        log.info("installed certificate for %s", served.workload.name)

    def set_trust(self, trust: TrustBundle) -> None:
        with self.lock:
            if self.trust == trust:
                return  # unchanged: no worker rebuilds its TLS contexts
            errors = self.pool.to_workers(self._trust_message(trust))
            if errors:
                raise ValueError("; ".join(errors))
            self.trust = trust
            self.policy.set_trust_domain(trust.trust_domain)

    def update_directory(self, update: DirectoryUpdate) -> None:
        """Apply one directory chunk here and in every worker (raises with the failures).

        The workers take the chunks of a change as they come, without the agent waiting for
        them on each: only the last chunk is acked once every worker applied the whole change,
        with any worker's failure on any chunk of it."""
        with self.lock:
            try:
                self.directory.receive(update)  # DirectoryError: out of order, nothing forwarded
            except DirectoryError:
                self.pool.wait()  # what was already forwarded; the agent resends all
                raise
            self.pool.send(_directory_message(update))
            if update.last:
                errors = self.pool.wait()
                if errors:
                    raise ValueError("; ".join(errors))

    def update_policy(self, part: PolicyChunk) -> None:
        """Forward one policy slice to every worker; on the last one, validate the version here
        too and ack once every worker has it in force (raises with every failure)."""
        with self.lock:
            self.pool.send(_policy_message(part))
            if part.version != (self._policy_pending[0].version if self._policy_pending else -1):
                self._policy_pending = []
            self._policy_pending.append(part)
            if not part.last:
                return
            pending, self._policy_pending = self._policy_pending, []
            errors = self.pool.wait()
            try:
                for piece in pending:
                    self.policy.receive(piece.version, piece.last, piece.text)
            except PolicyRejected as exc:
                errors.insert(0, str(exc))
            else:
                self.policy_slices = pending
                log.info("policy version %d in force: %d document(s)", part.version,
                         len(self.policy.policy.documents))  # fmt: skip
            if errors:
                raise ValueError("; ".join(dict.fromkeys(errors)))

    # -------------------------------------------------------------- workloads
    def add(self, workload: Workload, mode: str, netns_fd: int) -> None:
        with self.lock:
            current = self.served.get(workload.uid)
            if current is not None and current.workload == workload and current.mode == mode:
                os.close(netns_fd)  # already serving it (a snapshot after reconnect)
                self._register(current)
                return
            if current is not None and current.mode == mode and _relabelled(current, workload):
                os.close(netns_fd)  # the same namespace: keep its listeners and connections
                self._relabel(current, workload)
                return
            if current is not None:
                self.remove(workload.uid)
            inherited = self.inherited.get(workload.uid)
            if inherited is not None and not inherited.serves(netns_fd):
                inherited = None  # the uid names another namespace now: open fresh ones
            try:
                listeners = open_listeners(netns_fd, self.config.redirection,
                                           inherited.listeners if inherited else ())  # fmt: skip
            except OSError:
                os.close(netns_fd)
                raise
            if inherited is not None:
                self.inherited.pop(workload.uid).close(keep=listeners)
            served = Served(workload, netns_fd, listeners, mode)
            self.served[workload.uid] = served
            errors = self.pool.to_workers(self._add_message(served), _fds(served))
            if errors:
                self.remove(workload.uid)
                raise ValueError("; ".join(errors))
            self._register(served)
        log.info("serving %s (%s/%s): %d listener(s)", workload.name, workload.namespace,
                 workload.service_account, len(listeners))  # fmt: skip

    def _register(self, served: Served) -> None:
        """Put the inbound listeners where the eBPF backend's sk_lookup finds them, when its map
        is pinned in the state dir (`agent.redirect.ebpf_listeners`; the agent may have made it
        anew since the last time).  Without it inbound connections are refused (fail closed)."""
        inbound = [lst.sock for lst in served.listeners if lst.direction == "inbound"]
        try:
            ebpf_listeners.register(self.state_dir, inbound)
        except OSError as exc:
            log.error("%s: inbound listeners not registered for eBPF redirection: %s",
                      served.workload.name, exc)  # fmt: skip

    def _relabel(self, served: Served, workload: Workload) -> None:
        """New labels for a served workload, in place: every worker compiles its policy again
        and closes the connections the new labels no longer allow."""
        labels = dict(workload.labels)
        with self.lock:
            errors = self.pool.to_workers(lambda seq: Relabel(seq, workload.uid, labels))
            if errors:
                raise ValueError("; ".join(errors))
            served.workload = workload
        log.info("relabelled %s: %s", workload.name,
                 ",".join(f"{k}={v}" for k, v in workload.labels) or "no labels")  # fmt: skip

    def remove(self, uid: str) -> None:
        with self.lock:
            served = self.served.pop(uid, None)
            if served is None:
                return
            errors = self.pool.to_workers(lambda seq: RemoveWorkload(seq, uid))
            served.close()
        for error in errors:
            log.error("removing %s: %s", served.workload.name, error)
        log.info("stopped serving %s", served.workload.name)

    # ---------------------------------------------------------------- control
    def control_loop(self) -> None:
        backoff = BACKOFF_MIN
        path = self.state_dir / CONTROL_SOCKET
        while not self.stopping.is_set():
            if not self.link_allowed.wait(0.2):
                continue  # a successor holds the agent link
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            self.control_sock = sock
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            try:
                self._session(sock)
            except (ChannelClosed, ConnectionError, ProtocolError, OSError) as exc:
                if not self.stopping.is_set() and self.link_allowed.is_set():
                    log.warning("control connection to the agent lost: %s; reconnecting", exc)
            except Exception:  # a bug must not end the control thread: reconnect, fresh snapshot
                log.exception("control session failed; reconnecting")
            finally:
                synced = self.agent_connected
                self.agent_connected = False
                self.control_sock = None
                sock.close()
            # A session that got through a snapshot starts over fast; one that did not waits
            # longer each time, so a snapshot we cannot take is not retried in a tight loop.
            backoff = BACKOFF_MIN if synced else min(backoff * 2, BACKOFF_MAX)
            self.stopping.wait(backoff)

    def _session(self, sock: socket.socket) -> None:
        with self.lock:
            for failure in self.pool.wait():  # chunks of a change the last agent left
                log.warning("workers on an unfinished directory change: %s", failure)
            session = ProxySession(held=set(self.served))
        send_message(sock, Hello(proxy_version=__version__, pid=os.getpid()))
        log.info("connected to the agent at %s", sock.getpeername())
        while True:
            message, fds = recv_message(sock)
            error: str | None = None
            with self.lock:  # a successor takes the link between two messages, never within one
                try:
                    if not self.link_allowed.is_set():
                        raise ChannelClosed("the agent link went to the proxy taking over")
                    error = self._apply(session, message, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            send_message(sock, Ack(error))
            if isinstance(message, SnapshotSent) and error is None:
                self.agent_connected = True
                with self.lock:
                    self._release_inherited()  # what the snapshot did not name
                self.synced.set()

    def _apply(self, session: ProxySession, message: Message, fds: list[int]) -> str | None:
        """Perform one agent message; the error for its ack (None: applied)."""
        try:
            for action in session.receive(message):
                match action:
                    case Add(workload=workload, mode=mode):
                        self.add(workload, mode, fds.pop())
                    case WorkloadCertificate() as cert:
                        self.set_certificate(cert)
                    case TrustBundle() as trust:
                        self.set_trust(trust)
                    case DirectoryChunk(update=update):
                        self.update_directory(update)
                    case PolicyChunk() as part:
                        self.update_policy(part)
                    case Remove(uids=uids):
                        for uid in uids:
                            self.remove(uid)
        except (OSError, ValueError) as exc:
            log.error("could not apply %s: %s", type(message).__name__, exc)
            return str(exc)
        return None

    # ---------------------------------------------------------------- upgrade
    def yield_agent_link(self) -> list[tuple[str, int, list[Listener]]]:
        """A successor takes over: stop taking agent messages; what we serve, to hand over."""
        with self.lock:
            self.link_allowed.clear()
            if self.control_sock is not None:
                with contextlib.suppress(OSError):
                    self.control_sock.shutdown(socket.SHUT_RDWR)
            return [(uid, s.netns_fd, list(s.listeners)) for uid, s in self.served.items()]

    def resume_agent_link(self) -> None:
        """The successor gave up: talk to the agent again (a fresh snapshot)."""
        self.link_allowed.set()

    def stop_accepting(self) -> int:
        """Replaced (or rolling back): workers stop accepting and drain; our copies of the
        listeners close (the successor holds its own), and so do metrics, proxy.sock and
        handoff.sock (the successor binds them).  How many connections are open."""
        with self.lock:
            self.draining.set()
            for failure in self.pool.to_workers(lambda seq: Drain(seq)):
                log.error("draining: %s", failure)
            for uid in list(self.served):
                self.served.pop(uid).close()
        if self.local is not None:
            self.handing = self.local.handoff.thread  # it still owes the successor `draining`
            self.local.close(unlink=False)
            self.local = None
        return sum(s.active for s in self.pool.fresh_stats(timeout=0.5))

    def _release_inherited(self) -> None:
        for held in self.inherited.values():
            held.close()
        self.inherited.clear()

    def _predecessor(self, required: bool) -> PredecessorLink | None:
        """The running proxy to take over from, its listeners in `inherited`; None: none runs
        (or, unless `required`, it did not hand over in time: start without them)."""
        # Workers first when a proxy may run: it leaves the agent link when it hands over, and
        # the snapshot that follows should not also wait for our workers to start.
        if (self.state_dir / HANDOFF_SOCKET).exists():
            self.pool.wait_ready(self.config.proxy.handoff_timeout)
        link = PredecessorLink.connect(self.state_dir)
        if link is None:
            if required:
                path = self.state_dir / HANDOFF_SOCKET
                raise HandoffFailed(f"no proxy answers on {path}: nothing to take over (start "
                                    "one with `agent proxy`)")  # fmt: skip
            return None
        try:
            inherited = link.inherit(os.getpid(), __version__, self.config.proxy.handoff_timeout)
        except HandoffFailed as exc:
            link.close()
            if required:
                raise
            log.warning("%s; starting without its listeners", exc)
            return None
        with self.lock:
            self.inherited = inherited
        log.info("inherited the listeners of %d workload(s) from the running proxy",
                 len(inherited))  # fmt: skip
        return link

    def _take_over(self, link: PredecessorLink) -> None:
        """Once the agent's snapshot is applied and every worker is up, tell the predecessor
        (it stops accepting); raises HandoffFailed when it, or this proxy, gave up first."""
        timeout = self.config.proxy.handoff_timeout
        deadline = time.monotonic() + timeout
        while not (self.synced.is_set() and self.pool.alive == self.pool.count):
            if link.gone():
                raise HandoffFailed("the running proxy gave up waiting for this one")
            if self.stopping.is_set():
                raise HandoffFailed("stopped before taking over")
            if time.monotonic() > deadline:
                raise HandoffFailed(f"no snapshot from the agent with every worker up in "
                                    f"{timeout:.0f} s (proxy.handoff_timeout)")  # fmt: skip
            time.sleep(0.02)
        draining = link.serving(os.getpid(), timeout)
        log.info("took over: the previous proxy drains %d connection(s), at most %.0f s",
                 draining.connections, draining.deadline)  # fmt: skip

    def _wait_drained(self) -> None:
        timeout = self.config.proxy.drain_timeout
        started = time.monotonic()
        if self.pool.wait_exited(timeout):
            log.info("drained in %.1f s", time.monotonic() - started)
            return
        left = sum(s.active for s in self.pool.fresh_stats(timeout=0.5))
        log.warning("drain deadline (proxy.drain_timeout %.0f s): closing %d connection(s)",
                    timeout, left)  # fmt: skip

    # ------------------------------------------------------------------ stats
    def labelled(self) -> dict[str, Labelled]:
        with self.lock:
            return {
                uid: Labelled(s.workload.namespace, s.workload.name,
                              s.workload.identity(self.trust_domain))
                for uid, s in self.served.items()
            }  # fmt: skip

    def status(self, _body: dict[str, Any]) -> Reply:
        per_worker = self.pool.fresh_stats()
        with self.lock:
            workloads = {}
            for uid, s in self.served.items():
                flows = sum_flows(per_worker, uid)
                compiled = self.policy.for_workload(s.workload.namespace, dict(s.workload.labels))
                workloads[uid] = {
                    "policies": list(compiled.policies) if compiled is not None else [],
                    "decisions": sum_decisions(per_worker, uid),
                    "shed": sum_shed(per_worker, uid),
                    "name": s.workload.name,
                    "namespace": s.workload.namespace,
                    "service_account": s.workload.service_account,
                    "mode": s.mode,
                    "certificate_expires": s.certificate.not_after if s.certificate else None,
                    "listeners": [describe_listener(lst) for lst in s.listeners],
                    "traffic": totals(flows),
                    "flows": flows,
                }
            table = self.directory
            return {
                "ok": True,
                "version": __version__,
                "pid": os.getpid(),
                "workers": self.pool.count,
                "workers_alive": self.pool.alive,
                "agent_connected": self.agent_connected,
                "uptime_seconds": round(time.time() - self.started_at, 1),
                "active_connections": sum(s.active for s in per_worker),
                "trust_domain": self.trust.trust_domain if self.trust else None,
                "directory": {
                    "version": table.version,
                    "entries": len(table.entries),
                    "rejected": table.rejected,
                    "problems": list(table.problems),
                },
                "policy": {
                    "version": self.policy.version,
                    "documents": len(self.policy.policy.documents),
                },
                "applied": [{"worker": s.worker, **asdict(s.applied)} for s in per_worker],
                "tunnel": tunnel_totals(per_worker),
                "workloads": workloads,
            }

    # -------------------------------------------------------------------- run
    def run(self, report_fd: int | None = None) -> int:
        """Serve until SIGTERM, or until replaced and drained (then, unless
        `proxy.exit_after_drain`, until SIGTERM too, or 1 once no proxy serves): 0.  Take over
        from the proxy running on the state dir if there is one; 1 when that failed (it serves
        on).
        `report_fd` (`agent proxy --upgrade`): take over or fail, and say which there."""
        self.report_fd = report_fd
        prepare_state_dir(self.state_dir)
        self._mark_ready(False)  # a crashed predecessor's, in the same pod
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._reopen_logs)
        self.pool.start()
        try:
            link = self._predecessor(required=report_fd is not None)
        except HandoffFailed as exc:
            return self._failed(exc)
        control = threading.Thread(target=self.control_loop, name="control", daemon=True)
        control.start()
        if link is not None:
            try:
                self._take_over(link)
            except HandoffFailed as exc:
                self.yield_agent_link()  # the agent is the running proxy's again ...
                link.close()  # ... as soon as it sees this
                self._report(f"failed: {exc} (the running proxy serves on)")
                self.stop_accepting()  # drain what this one accepted meanwhile
                self._wait_drained()
                return self._failed(exc)
            link.close()
        self.local = LocalServices.start(self)
        notify_systemd(f"MAINPID={os.getpid()}", "READY=1")
        self._report(f"ok: proxy pid {os.getpid()} serves" +
                     (" (it took over; the previous one drains)" if link else ""))  # fmt: skip
        log.info("proxy %s: %d worker(s), metrics on http://%s, state dir %s", __version__,
                 self.worker_count, self.config.proxy.metrics_address, self.state_dir)  # fmt: skip
        while not self.stopping.is_set() and not self.draining.is_set():
            self._mark_ready(not self.ready())
            with contextlib.suppress(queue.Empty):
                index = self.pool.dead.get(timeout=0.5)
                with self.lock:
                    if self.draining.is_set():
                        break  # a drained worker exits by design
                    for error in self.pool.respawn(index, self._state()):
                        log.error("restarted worker %d: %s", index, error)
        self._mark_ready(False)
        if self.draining.is_set():
            if self.handing is not None:  # drained at once: not before the successor knows
                self.handing.join(self.config.proxy.handoff_timeout)
            self._wait_drained()
            if not self.config.proxy.exit_after_drain and not self._stay_idle():
                self._close()
                return 1
        self._close()
        return 0

    def _mark_ready(self, ready: bool) -> None:
        """`proxy.ready_file` exists exactly while this proxy serves and is ready: a pod's own
        readiness, where the node's metrics port answers for whichever proxy holds it."""
        if not self.config.proxy.ready_file:
            return
        path = Path(self.config.proxy.ready_file)
        if ready:
            path.touch(mode=0o600)
        else:
            path.unlink(missing_ok=True)

    def _stay_idle(self) -> bool:
        """Drained, but told to stay (`proxy.exit_after_drain: false`, in a pod, where an exited
        container is restarted and would take the listeners back): no worker, no listener, no
        port or socket of the state dir held, until SIGTERM (True).  False when no proxy has
        answered on the metrics port for ORPHANED_AFTER (the successor stopped without one of
        its own, e.g. an older release's that was replaced cold): exit, to be started again."""
        self.pool.stop()
        self.idle.set()
        if self.terminated.is_set():  # its pod was deleted while it drained: done
            return True
        log.info("drained; idle until SIGTERM (proxy.exit_after_drain: false)")
        address = parse_address("proxy.metrics_address", self.config.proxy.metrics_address)
        answered = time.monotonic()
        while not self.stopping.wait(0.5):
            if _answers(address):
                answered = time.monotonic()
            elif time.monotonic() - answered > ORPHANED_AFTER:
                log.error("no proxy has answered on %s for %.0f s: exiting, to be started again",
                          self.config.proxy.metrics_address, ORPHANED_AFTER)  # fmt: skip
                return False
        return True

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.terminated.set()
        if not self.draining.is_set() or self.idle.is_set():  # draining: ends with its connections
            self.stopping.set()

    def _reopen_logs(self, _signum: int, _frame: object) -> None:
        """SIGHUP (logrotate): every worker reopens its access log."""
        for handle in self.pool.handles:
            with contextlib.suppress(ProcessLookupError):
                handle.process.send_signal(signal.SIGHUP)

    def alive(self) -> str:
        """/healthz: "" while a worker serves, else why not."""
        return "" if self.pool.alive else "no proxy worker is running"

    def ready(self) -> str:
        """/readyz: "" when every worker runs and the agent's snapshot is in, else why not."""
        if self.pool.alive < self.worker_count:
            return f"{self.pool.alive} of {self.worker_count} proxy workers are running"
        return "" if self.agent_connected else "not connected to the agent"

    def _failed(self, exc: HandoffFailed) -> int:
        log.error("taking over failed: %s", exc)
        self._report(f"failed: {exc}")
        self._close()
        return 1

    def _report(self, line: str) -> None:
        report(self.report_fd, line)
        self.report_fd = None  # closed: once

    def _close(self) -> None:
        self.stopping.set()
        if self.local is not None:
            self.local.close(unlink=True)
            self.local = None
        self.pool.stop()
        with self.lock:
            for uid in list(self.served):
                self.served.pop(uid).close()
            self._release_inherited()
        log.info("proxy stopped")


@dataclass
class LocalServices:
    """What only the proxy in charge binds: metrics, proxy.sock (status), handoff.sock."""

    state_dir: Path
    metrics: socketserver.BaseServer
    admin: socketserver.BaseServer
    handoff: HandoffServer

    @classmethod
    def start(cls, sup: Supervisor) -> LocalServices:
        registry = CollectorRegistry(auto_describe=True)
        fresh = lambda: sup.pool.fresh_stats(timeout=0.5)  # noqa: E731
        registry.register(MetricsCollector(fresh, sup.labelled, lambda: sup.agent_connected,
                                           sup.config.telemetry))  # fmt: skip
        metrics = _metrics_server(sup.config.proxy.metrics_address, registry, sup)
        admin = serve_thread(sup.state_dir / PROXY_SOCKET, sup.status)
        proxy = sup.config.proxy
        handoff = HandoffServer(sup.state_dir, sup, proxy.handoff_timeout, proxy.drain_timeout)
        return cls(sup.state_dir, metrics, admin, handoff)

    def close(self, unlink: bool) -> None:
        """Stop serving them; `unlink`: remove the socket files too (not when a successor
        binds them next)."""
        self.handoff.close()
        for server in (self.admin, self.metrics):
            server.shutdown()
            server.server_close()
        if unlink:
            for name in (PROXY_SOCKET, HANDOFF_SOCKET):
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / name).unlink()


def _metrics_server(
    address: str, registry: CollectorRegistry, sup: Supervisor
) -> socketserver.BaseServer:
    """Prometheus, /healthz and /readyz on `address`; a port a predecessor just let go of is
    retried briefly."""
    host, port = parse_address("proxy.metrics_address", address)
    deadline = time.monotonic() + BIND_RETRY
    while True:
        try:
            return endpoints.serve(host, port, registry, sup.alive, sup.ready)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _answers(address: tuple[str, int]) -> bool:
    """A proxy listens on its metrics `address` (connected, then closed without a request)."""
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=1.0):
        return True
    return False


def _relabelled(served: Served, workload: Workload) -> bool:
    """`workload` is the served one with other labels (or name) only."""
    old = served.workload
    return replace(old, labels=workload.labels, name=workload.name) == workload


def _fds(served: Served) -> list[int]:
    return [served.netns_fd, *(lst.sock.fileno() for lst in served.listeners)]


def _cert_message(cert: WorkloadCertificate) -> Callable[[int], ToWorker]:
    return lambda seq: SetCertificate(seq, cert.uid, cert.chain_pem, cert.key_pem, cert.not_after)


def _directory_message(update: DirectoryUpdate) -> Callable[[int], ToWorker]:
    return lambda seq: UpdateDirectory(seq, update)


def _policy_message(part: PolicyChunk) -> Callable[[int], ToWorker]:
    return lambda seq: UpdatePolicy(seq, part.version, part.last, part.text)


def describe_listener(listener: Listener) -> dict[str, Any]:
    host, port = listener.sock.getsockname()[:2]
    listening = listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    return {
        "direction": listener.direction,
        "family": listener.family,
        "address": f"[{host}]:{port}" if listener.family == 6 else f"{host}:{port}",
        "listening": listening,
    }


def run_proxy(config: Config, state_dir: Path, workers: int, report_fd: int | None = None) -> int:
    return Supervisor(config, state_dir, workers).run(report_fd)
