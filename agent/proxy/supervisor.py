"""`agent proxy`: the per-node proxy's supervisor process.

The supervisor never touches payload.  It:
- connects to the agent's `control.sock` (retrying with backoff, 10 ms doubling to 2 s), says
  hello, and applies what the agent sends through `ProxySession`: for each workload it opens
  the in-pod listeners once (`sockets.open_listeners`, inside the pod's netns) and hands the netns
  fd and the listener fds to every worker; a snapshot drops what the agent no longer holds;
- starts N worker processes (`agent.proxy.worker`, with OPENSSL_CONF set to Ferry's
  `agent/tunnel/openssl.cnf`: TLS 1.3 suite preference), each running its own epoll loop over the
  *same* listening sockets (EPOLLEXCLUSIVE), so N cores share the work without N copies of any
  pod's listeners; a worker that dies is restarted and given every workload again;
- aggregates the workers' cumulative counters for Prometheus (`127.0.0.1:15020/metrics` by
  default) and for `agent status` (`<state-dir>/proxy.sock`).

When the agent goes away the proxy keeps serving what it has; when the proxy goes away its
listeners close with it and redirected connections are refused (fail closed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.admin import PROXY_SOCKET, Reply, prepare_state_dir, serve_thread
from agent.config import Config, parse_address
from agent.control.channel import CONTROL_SOCKET, ChannelClosed, recv_message, send_message
from agent.control.protocol import (
    Ack,
    Add,
    Directory,
    Hello,
    ProtocolError,
    ProxySession,
    Remove,
    TrustBundle,
    WorkloadCertificate,
)
from agent.proxy.sockets import Listener, open_listeners
from agent.proxy.worker import COUNTERS
from agent.tunnel.tls import worker_environment
from agent.workloads import Workload

log = logging.getLogger("ferry.proxy")
BACKOFF_MIN, BACKOFF_MAX = 0.01, 2.0
DIRECTIONS = ("outbound", "inbound")


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


@dataclass
class WorkerHandle:
    index: int
    process: subprocess.Popen[bytes]
    control: socket.socket
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    stats: dict[str, Any] = field(default_factory=dict)
    replies: int = 0

    def send(self, body: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(body).encode()
        with self.send_lock:
            if fds:
                socket.send_fds(self.control, [data], fds)
            else:
                self.control.sendall(data)


class Supervisor:
    def __init__(self, config: Config, state_dir: Path, workers: int) -> None:
        self.config = config
        self.state_dir = state_dir
        self.worker_count = workers or os.cpu_count() or 1
        self.served: dict[str, Served] = {}
        self.workers: list[WorkerHandle] = []
        self.lock = threading.RLock()
        self.stats_changed = threading.Condition(self.lock)
        self.agent_connected = False
        self.started_at = time.time()
        self.stopping = threading.Event()
        self.respawn: queue.Queue[int] = queue.Queue()
        self.trust: TrustBundle | None = None
        self.directory: Directory | None = None
        self.trust_domain = config.identity.trust_domain

    # ---------------------------------------------------------------- workers
    def _spawn(self, index: int) -> WorkerHandle:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = {
            "proxy": asdict(self.config.proxy),
            "redirection": asdict(self.config.redirection),
        }
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.proxy.worker",
                "--control-fd",
                str(theirs.fileno()),
                "--worker-id",
                str(index),
                "--config-json",
                json.dumps(settings),
            ],
            pass_fds=[theirs.fileno()],
            env=worker_environment(),  # TLS 1.3 suite preference (agent/tunnel/openssl.cnf)
        )
        theirs.close()
        handle = WorkerHandle(index, process, ours)
        threading.Thread(
            target=self._read_worker, args=(handle,), name=f"worker-{index}", daemon=True
        ).start()
        return handle

    def _read_worker(self, handle: WorkerHandle) -> None:
        while True:
            try:
                data = handle.control.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                break
            body = json.loads(data)
            if body.get("op") == "stats":
                with self.lock:
                    handle.stats = body
                    handle.replies += 1
                    self.stats_changed.notify_all()
        if not self.stopping.is_set():
            self.respawn.put(handle.index)

    def _respawn(self, index: int) -> None:
        """Restart a dead worker (from the main thread: PDEATHSIG follows the spawning thread)."""
        with self.lock:
            old = self.workers[index]
            log.error("worker %d (pid %d) exited; restarting it", index, old.process.pid)
            old.process.wait()
            old.control.close()
            replacement = self._spawn(index)
            self.workers[index] = replacement
            self._send_state(replacement)

    def _send_state(self, worker: WorkerHandle) -> None:
        """Everything a (new) worker needs: trust, directory, every workload and its cert."""
        if self.trust is not None:
            worker.send(self._trust_op(self.trust))
        if self.directory is not None:
            worker.send(self._directory_op(self.directory))
        for served in self.served.values():
            self._send_add(worker, served)
            if served.certificate is not None:
                worker.send(self._cert_op(served.certificate))

    @staticmethod
    def _trust_op(trust: TrustBundle) -> dict[str, Any]:
        return {"op": "trust", "trust_domain": trust.trust_domain, "bundle_pem": trust.bundle_pem}

    @staticmethod
    def _directory_op(directory: Directory) -> dict[str, Any]:
        entries = {e.ip: {"identity": e.identity, "node": e.node} for e in directory.entries}
        return {"op": "directory", "entries": entries, "egress": directory.egress}

    @staticmethod
    def _cert_op(cert: WorkloadCertificate) -> dict[str, Any]:
        return {
            "op": "cert",
            "uid": cert.uid,
            "chain_pem": cert.chain_pem,
            "key_pem": cert.key_pem,
        }

    def _broadcast(self, body: dict[str, Any]) -> None:
        for worker in self.workers:
            with contextlib.suppress(OSError):  # a dead worker gets everything on respawn
                worker.send(body)

    def set_certificate(self, cert: WorkloadCertificate) -> None:
        with self.lock:
            served = self.served.get(cert.uid)
            if served is None:
                raise ValueError(f"certificate for {cert.uid!r}, which this proxy does not serve")
            served.certificate = cert
            self._broadcast(self._cert_op(cert))
        log.info("installed certificate for %s", served.workload.name)

    def set_trust(self, trust: TrustBundle) -> None:
        with self.lock:
            self.trust = trust
            self._broadcast(self._trust_op(trust))

    def set_directory(self, directory: Directory) -> None:
        with self.lock:
            self.directory = directory
            self._broadcast(self._directory_op(directory))

    def _send_add(self, worker: WorkerHandle, served: Served) -> None:
        worker.send(
            {
                "op": "add",
                "uid": served.workload.uid,
                "identity": served.workload.identity(self.trust_domain),
                "mode": served.mode,
                "ips": list(served.workload.ips),
                "listeners": [
                    {"direction": lst.direction, "family": lst.family} for lst in served.listeners
                ],
            },
            [served.netns_fd, *(lst.sock.fileno() for lst in served.listeners)],
        )

    # -------------------------------------------------------------- workloads
    def add(self, workload: Workload, mode: str, netns_fd: int) -> None:
        with self.lock:
            current = self.served.get(workload.uid)
            if current is not None and current.workload == workload and current.mode == mode:
                os.close(netns_fd)  # already serving it (a snapshot after reconnect)
                return
            if current is not None:
                self.remove(workload.uid)
            try:
                listeners = open_listeners(netns_fd, self.config.redirection)
            except OSError:
                os.close(netns_fd)
                raise
            served = Served(workload, netns_fd, listeners, mode)
            self.served[workload.uid] = served
            for worker in self.workers:
                self._send_add(worker, served)
        log.info(
            "serving %s (%s/%s): %d listener(s)",
            workload.name,
            workload.namespace,
            workload.service_account,
            len(listeners),
        )

    def remove(self, uid: str) -> None:
        with self.lock:
            served = self.served.pop(uid, None)
            if served is None:
                return
            for worker in self.workers:
                worker.send({"op": "del", "uid": uid})
            served.close()
        log.info("stopped serving %s", served.workload.name)

    # ---------------------------------------------------------------- control
    def control_loop(self) -> None:
        backoff = BACKOFF_MIN
        path = self.state_dir / CONTROL_SOCKET
        while not self.stopping.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            try:
                self._session(sock)
            except (ChannelClosed, ConnectionError, ProtocolError, OSError) as exc:
                if not self.stopping.is_set():
                    log.warning("control connection to the agent lost: %s; reconnecting", exc)
            finally:
                self.agent_connected = False
                sock.close()

    def _session(self, sock: socket.socket) -> None:
        with self.lock:
            session = ProxySession(held=set(self.served))
        send_message(sock, Hello(proxy_version=__version__, pid=os.getpid()))
        self.agent_connected = True
        log.info("connected to the agent at %s", sock.getpeername())
        while True:
            message, fds = recv_message(sock)
            error: str | None = None
            try:
                for action in session.receive(message):
                    match action:
                        case Add(workload=workload, mode=mode):
                            self.add(workload, mode, fds.pop())
                        case WorkloadCertificate() as cert:
                            self.set_certificate(cert)
                        case TrustBundle() as trust:
                            self.set_trust(trust)
                        case Directory() as directory:
                            self.set_directory(directory)
                        case Remove(uids=uids):
                            for uid in uids:
                                self.remove(uid)
            except (OSError, ValueError) as exc:
                error = str(exc)
                log.error("could not apply %s: %s", type(message).__name__, exc)
            finally:
                for fd in fds:
                    os.close(fd)
            send_message(sock, Ack(error))

    # ------------------------------------------------------------------ stats
    def fresh_stats(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Ask every worker for its counters and wait (briefly) for all replies."""
        with self.lock:
            wanted = {w.index: w.replies + 1 for w in self.workers}
            for worker in self.workers:
                with contextlib.suppress(OSError):
                    worker.send({"op": "stats"})
            deadline = time.monotonic() + timeout
            while any(w.replies < wanted.get(w.index, 0) for w in self.workers):
                left = deadline - time.monotonic()
                if left <= 0 or not self.stats_changed.wait(left):
                    break
            return [w.stats for w in self.workers]

    def totals(self, per_worker: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
        """Sum the workers' cumulative counters per workload uid and direction."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for stats in per_worker:
            for uid, directions in stats.get("workloads", {}).items():
                entry = out.setdefault(uid, {d: dict.fromkeys(COUNTERS, 0) for d in DIRECTIONS})
                for direction, counters in directions.items():
                    for key in COUNTERS:
                        entry.setdefault(direction, dict.fromkeys(COUNTERS, 0))
                        entry[direction][key] += int(counters.get(key, 0))
        return out

    def status(self, _body: dict[str, Any]) -> Reply:
        per_worker = self.fresh_stats()
        totals = self.totals(per_worker)
        with self.lock:
            workloads = {
                uid: {
                    "name": s.workload.name,
                    "namespace": s.workload.namespace,
                    "service_account": s.workload.service_account,
                    "mode": s.mode,
                    "certificate_expires": s.certificate.not_after if s.certificate else None,
                    "listeners": [describe_listener(lst) for lst in s.listeners],
                    "traffic": totals.get(uid, {}),
                    "flows": flows(per_worker, uid),
                }
                for uid, s in self.served.items()
            }
        return {
            "ok": True,
            "version": __version__,
            "pid": os.getpid(),
            "workers": len(self.workers),
            "workers_alive": sum(1 for w in self.workers if w.process.poll() is None),
            "agent_connected": self.agent_connected,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "active_connections": sum(int(s.get("active", 0)) for s in per_worker),
            "trust_domain": self.trust.trust_domain if self.trust else None,
            "directory_entries": len(self.directory.entries) if self.directory else 0,
            "tunnel": tunnel_totals(per_worker),
            "workloads": workloads,
        }

    # -------------------------------------------------------------------- run
    def run(self) -> None:
        prepare_state_dir(self.state_dir)
        self.workers = [self._spawn(i) for i in range(self.worker_count)]
        host, port = parse_address("proxy.metrics_address", self.config.proxy.metrics_address)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(MetricsCollector(self))
        metrics_server, _thread = start_http_server(port, addr=host, registry=registry)
        admin = serve_thread(self.state_dir / PROXY_SOCKET, self.status)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stopping.set())
        control = threading.Thread(target=self.control_loop, name="control", daemon=True)
        control.start()
        log.info(
            "proxy %s: %d worker(s), metrics on http://%s:%d/metrics, state dir %s",
            __version__,
            self.worker_count,
            host,
            port,
            self.state_dir,
        )
        while not self.stopping.is_set():
            with contextlib.suppress(queue.Empty):
                self._respawn(self.respawn.get(timeout=0.5))
        admin.shutdown()
        metrics_server.shutdown()
        with self.lock:
            for worker in self.workers:
                worker.process.terminate()
            for worker in self.workers:
                try:
                    worker.process.wait(5)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
            for uid in list(self.served):
                self.served.pop(uid).close()
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / PROXY_SOCKET).unlink()
        log.info("proxy stopped")


FLOW_KEYS = ("direction", "security", "peer_identity")


def flows(per_worker: list[dict[str, Any]], uid: str) -> list[dict[str, Any]]:
    """One workload's traffic per (direction, security, peer identity), summed over workers."""
    summed: dict[tuple[str, ...], dict[str, Any]] = {}
    for stats in per_worker:
        for flow in stats.get("flows", {}).get(uid, []):
            key = tuple(str(flow.get(k, "")) for k in FLOW_KEYS)
            entry = summed.setdefault(key, dict(zip(FLOW_KEYS, key, strict=True)))
            for name, value in flow.items():
                if name not in FLOW_KEYS and isinstance(value, int):
                    entry[name] = entry.get(name, 0) + value
    return [summed[key] for key in sorted(summed)]


def tunnel_totals(per_worker: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for stats in per_worker:
        for name, value in stats.get("tunnel", {}).items():
            out[name] = out.get(name, 0) + int(value)
    return out


def describe_listener(listener: Listener) -> dict[str, Any]:
    host, port = listener.sock.getsockname()[:2]
    listening = listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    return {
        "direction": listener.direction,
        "family": listener.family,
        "address": f"[{host}]:{port}" if listener.family == 6 else f"{host}:{port}",
        "listening": listening,
    }


class MetricsCollector(Collector):
    """Prometheus view of the workers' counters: per workload, direction, security (mtls or
    plaintext) and source/destination identity, as Istio labels its TCP metrics."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        sup = self.supervisor
        per_worker = sup.fresh_stats(timeout=0.5)
        labels = [
            "workload_namespace",
            "workload",
            "direction",
            "security",
            "source_identity",
            "destination_identity",
        ]
        families = {
            key: CounterMetricFamily(f"ferry_proxy_{name}", text, labels=labels)
            for key, name, text in (
                ("connections_opened", "connections_opened", "TCP connections relayed"),
                ("connections_closed", "connections_closed", "relayed TCP connections closed"),
                ("connect_failures", "connect_failures", "upstream connects that failed"),
                ("denied", "connections_denied", "connections refused by mode or egress"),
                ("bytes_received", "received_bytes", "bytes from client to server"),
                ("bytes_sent", "sent_bytes", "bytes from server to client"),
            )
        }
        with sup.lock:
            workloads = {uid: s.workload for uid, s in sup.served.items()}
        for uid, workload in sorted(workloads.items()):
            own = workload.identity(sup.trust_domain)
            for flow in flows(per_worker, uid):
                peer = flow["peer_identity"] or "unknown"
                source, destination = (
                    (own, peer) if flow["direction"] == "outbound" else (peer, own)
                )
                values = [
                    workload.namespace,
                    workload.name,
                    flow["direction"],
                    flow["security"],
                    source,
                    destination,
                ]
                for key, family in families.items():
                    family.add_metric(values, flow.get(key, 0))
        yield from families.values()
        active = GaugeMetricFamily("ferry_proxy_active_connections", "open relayed connections")
        active.add_metric([], sum(int(s.get("active", 0)) for s in per_worker))
        yield active
        enrolled = GaugeMetricFamily("ferry_proxy_workloads", "workloads served by this proxy")
        enrolled.add_metric([], len(workloads))
        yield enrolled
        connected = GaugeMetricFamily(
            "ferry_proxy_agent_connected", "1 when the agent is connected"
        )
        connected.add_metric([], 1 if sup.agent_connected else 0)
        yield connected
        info = GaugeMetricFamily("ferry_build_info", "Ferry version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def run_proxy(config: Config, state_dir: Path, workers: int) -> None:
    Supervisor(config, state_dir, workers).run()
