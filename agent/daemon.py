"""`agent run`: the node agent (control plane of one node).

It owns the node's enrollments and keeps three things in agreement with them:
- the redirection rules inside every enrolled network namespace (through the backend, in a
  dedicated netns thread),
- every connected proxy (over `control.sock`: a full snapshot on each (re)connect, then
  incremental adds and dels, every message acked),
- the enrollment store on disk (so a restart loses nothing).

Enrollment order: persist, hand the workload to the proxies (so its listeners exist), then program
redirection; any failure rolls all three back and the caller gets the error.  Unenrollment removes
redirection first (traffic goes direct again), then tells the proxies.  A periodic reconcile
(`reconcile.plan_reconcile`) repairs drifted rules, forgets namespaces that disappeared and
enrolls declared workloads whose namespace appeared.  Everything runs on one asyncio loop; blocking
kernel work goes to the netns thread, so requests stay serialized by `_mutate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from agent import __version__
from agent.admin import AGENT_SOCKET, Reply, prepare_state_dir, serve_async
from agent.config import MODES, Config, WorkloadSpec, validate_name
from agent.control.channel import CONTROL_SOCKET, AsyncChannel, ChannelClosed
from agent.control.protocol import (
    Ack,
    AddWorkload,
    DelWorkload,
    Directory,
    DirectoryEntry,
    Hello,
    Message,
    ProtocolError,
    SnapshotSent,
    TrustBundle,
    WorkloadCertificate,
)
from agent.directory import entries_for, merge, publish, read_folder
from agent.identity.certs import NodeSigner, renewal_due
from agent.identity.certs import WorkloadCertificate as MintedCertificate
from agent.identity.spiffe import IdentityError
from agent.netns import (
    NETNS_RUN_DIR,
    NetnsError,
    NetnsExecutor,
    netns_inode,
    open_netns,
    resolve_netns,
)
from agent.reconcile import (
    EnrollDeclared,
    Forget,
    Observation,
    ReconcileAction,
    Repair,
    describe,
    plan_reconcile,
)
from agent.redirect.iptables import IptablesRedirection
from agent.workloads import (
    EnrollmentError,
    EnrollmentStore,
    Workload,
    plan_enroll,
    plan_unenroll,
)

log = logging.getLogger("ferry.agent")
ACK_TIMEOUT = 10.0
HELLO_TIMEOUT = 5.0


def make_workload(
    netns_arg: str, namespace: str, service_account: str, mode: str | None = None
) -> Workload:
    """Validate an enrollment request into a `Workload` (raises with the bad value named)."""
    validate_name("namespace", namespace)
    validate_name("service account", service_account)
    if mode is not None and mode not in MODES:
        raise EnrollmentError(f"invalid mode {mode!r}: must be one of {', '.join(MODES)}")
    path = resolve_netns(netns_arg)
    return Workload(
        uid=str(path),
        name=path.name,
        netns=str(path),
        netns_inode=netns_inode(path),
        namespace=namespace,
        service_account=service_account,
        mode=mode,
    )


def pod_addresses() -> tuple[str, ...]:
    """The global unicast addresses of the calling thread's netns (run it inside a pod)."""
    with IPRoute() as ipr:
        found = []
        for message in ipr.get_addr():
            attrs = dict(message["attrs"])
            address = ipaddress.ip_address(attrs["IFA_ADDRESS"])
            if not (address.is_loopback or address.is_link_local):
                found.append(str(address))
        return tuple(sorted(found))


def load_signer(config: Config, state_dir: Path) -> NodeSigner | None:
    """The node's signing credentials; None (plaintext mesh) when there are none at all."""
    folder = Path(config.identity.node_credentials or state_dir / "identity")
    if not folder.exists():
        log.warning(
            "no node credentials in %s: workloads get no certificates and traffic stays "
            "plaintext (create them with `agent ca issue-node`)",
            folder,
        )
        return None
    return NodeSigner.load(folder, config.identity.trust_domain)


@dataclass
class ProxyLink:
    """One connected proxy; `lock` keeps each message paired with its ack."""

    channel: AsyncChannel
    hello: Hello
    connected_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def request(self, message: Message, fds: tuple[int, ...] = ()) -> None:
        await self.channel.send(message, fds)
        reply, extra = await asyncio.wait_for(self.channel.recv(), ACK_TIMEOUT)
        for fd in extra:
            os.close(fd)
        if not isinstance(reply, Ack):
            raise ProtocolError(f"expected ack, proxy sent {type(reply).__name__}")
        if reply.error:
            raise EnrollmentError(f"proxy (pid {self.hello.pid}) refused: {reply.error}")


class Agent:
    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.store = EnrollmentStore(state_dir)
        self.executor = NetnsExecutor()
        self.backend = IptablesRedirection(config.redirection, self.executor)
        self.enrollments: dict[str, Workload] = {}
        self.proxies: list[ProxyLink] = []
        self.started_at = time.time()
        self.last_reconcile: dict[str, Any] = {}
        self.signer: NodeSigner | None = None
        self.certificates: dict[str, MintedCertificate] = {}
        self.directory_folder = Path(config.mesh.directory or state_dir / "directory")
        self.directory: tuple[DirectoryEntry, ...] = ()
        self._mutate = asyncio.Lock()
        self._stop = asyncio.Event()

    # ----------------------------------------------------------------- proxies
    async def _send_to_proxies(self, message: Message, workload: Workload | None = None) -> int:
        """Send to every connected proxy; returns how many acked.  A broken link is dropped."""
        acked = 0
        for link in list(self.proxies):
            fd = open_netns(workload.netns) if workload is not None else None
            try:
                async with link.lock:
                    await link.request(message, (fd,) if fd is not None else ())
                acked += 1
            except (ChannelClosed, ProtocolError, OSError, TimeoutError) as exc:
                log.warning("dropping proxy pid %s: %s", link.hello.pid, exc)
                self._drop(link)
            finally:
                if fd is not None:
                    os.close(fd)
        return acked

    async def _add_everywhere(self, workload: Workload) -> int:
        """Hand a workload and its certificate to every proxy; returns how many acked."""
        acked = await self._send_to_proxies(AddWorkload(workload, self._mode(workload)), workload)
        cert = self._certificate(workload)
        if cert is not None:
            await self._send_to_proxies(self._certificate_message(workload.uid, cert))
        return acked

    def _mode(self, workload: Workload) -> str:
        return self.config.mesh.mode_for(workload.namespace, workload.mode)

    def _certificate(self, workload: Workload, renew: bool = False) -> MintedCertificate | None:
        """The workload's current certificate, minted (again) when missing, due or asked."""
        if self.signer is None:
            return None
        now = dt.datetime.now(dt.UTC)
        current = self.certificates.get(workload.uid)
        if current is None or renew or renewal_due(current, now):
            current = self.signer.mint(
                workload.namespace,
                workload.service_account,
                self.config.identity.workload_cert_ttl,
                now,
            )
            self.certificates[workload.uid] = current
            log.info(
                "issued certificate for %s (%s), serial %x, expires %s",
                workload.name,
                current.spiffe_id,
                current.serial,
                current.not_after.isoformat(),
            )
        return current

    @staticmethod
    def _certificate_message(uid: str, cert: MintedCertificate) -> WorkloadCertificate:
        return WorkloadCertificate(
            uid, cert.chain_pem.decode(), cert.key_pem.decode(), cert.not_after.timestamp()
        )

    def _trust_message(self) -> TrustBundle | None:
        if self.signer is None:
            return None
        return TrustBundle(self.config.identity.trust_domain, self.signer.bundle_pem.decode())

    def _directory_message(self) -> Directory:
        return Directory(self.directory, self.config.mesh.egress)

    async def _publish_directory(self) -> None:
        """Publish this node's entries and refresh the merged view (sent when it changed)."""
        own = entries_for(
            self.config.node_name, self.enrollments.values(), self.config.identity.trust_domain
        )
        await asyncio.to_thread(publish, self.directory_folder, self.config.node_name, own)
        await self._refresh_directory()

    async def _refresh_directory(self) -> None:
        per_node = await asyncio.to_thread(read_folder, self.directory_folder)
        per_node[self.config.node_name] = entries_for(
            self.config.node_name, self.enrollments.values(), self.config.identity.trust_domain
        )
        merged = merge(per_node)
        if merged != self.directory:
            self.directory = merged
            await self._send_to_proxies(self._directory_message())

    def _drop(self, link: ProxyLink) -> None:
        if link in self.proxies:
            self.proxies.remove(link)
        link.channel.close()

    async def _on_proxy(self, sock: socket.socket) -> None:
        channel = AsyncChannel(sock)
        try:
            hello, fds = await asyncio.wait_for(channel.recv(), HELLO_TIMEOUT)
            for fd in fds:
                os.close(fd)
            if not isinstance(hello, Hello):
                raise ProtocolError(f"expected hello, got {type(hello).__name__}")
        except (ChannelClosed, ProtocolError, OSError, TimeoutError) as exc:
            log.warning("rejected proxy connection: %s", exc)
            channel.close()
            return
        link = ProxyLink(channel, hello)
        async with self._mutate, link.lock:
            try:
                for workload in list(self.enrollments.values()):
                    try:
                        fd = open_netns(workload.netns)
                    except (OSError, NetnsError):
                        continue  # gone: the next reconcile forgets it
                    try:
                        await link.request(AddWorkload(workload, self._mode(workload)), (fd,))
                    finally:
                        os.close(fd)
                trust = self._trust_message()
                if trust is not None:
                    await link.request(trust)
                for workload in list(self.enrollments.values()):
                    cert = self._certificate(workload)
                    if cert is not None:
                        await link.request(self._certificate_message(workload.uid, cert))
                await link.request(self._directory_message())
                await link.request(SnapshotSent())
            except (ChannelClosed, ProtocolError, EnrollmentError, OSError, TimeoutError) as exc:
                log.warning("snapshot to proxy pid %s failed: %s", hello.pid, exc)
                channel.close()
                return
            self.proxies.append(link)
        log.info(
            "proxy pid %s (version %s) connected; sent snapshot of %d workload(s)",
            hello.pid,
            hello.proxy_version,
            len(self.enrollments),
        )
        await self._watch(link)

    async def _watch(self, link: ProxyLink) -> None:
        """Notice a proxy that goes away while idle: poll for EOF between requests."""
        while link in self.proxies:
            await asyncio.sleep(0.5)
            if link.lock.locked():
                continue  # a request is reading from the socket right now
            try:
                alive = bool(link.channel.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                continue
            except OSError:
                alive = False
            if not alive:
                log.warning("proxy pid %s disconnected", link.hello.pid)
                self._drop(link)

    # ------------------------------------------------------------- enrollment
    async def enroll(self, workload: Workload) -> Reply:
        started = time.monotonic()
        async with self._mutate:
            plan_enroll(self.enrollments, workload)  # refuse early: nothing changes
            ips = await asyncio.to_thread(self.executor.call, workload.netns, pod_addresses)
            workload = replace(workload, ips=ips)
            new = plan_enroll(self.enrollments, workload)
            with self.store.locked():
                self.store.save(new)
            try:
                acked = await self._add_everywhere(workload)
                await asyncio.to_thread(self.backend.apply, Path(workload.netns))
            except Exception as exc:
                await asyncio.to_thread(self.backend.remove, Path(workload.netns))
                await self._send_to_proxies(DelWorkload(workload.uid))
                with self.store.locked():
                    self.store.save(self.enrollments)
                self.certificates.pop(workload.uid, None)
                raise EnrollmentError(f"enrolling {workload.name!r} failed: {exc}") from exc
            self.enrollments = new
            await self._publish_directory()
        elapsed = time.monotonic() - started
        log.info(
            "enrolled %s as %s/%s in %.1f ms (%d proxy ack(s))",
            workload.name,
            workload.namespace,
            workload.service_account,
            elapsed * 1e3,
            acked,
        )
        return {
            "ok": True,
            "workload": workload.to_json(),
            "proxies": acked,
            "elapsed_ms": round(elapsed * 1e3, 2),
        }

    async def unenroll(self, netns_arg: str) -> Reply:
        async with self._mutate:
            path = Path(netns_arg) if "/" in netns_arg else resolve_name(netns_arg)
            workload = self.enrollments.get(str(path))
            new = plan_unenroll(self.enrollments, str(path), netns_arg)
            with self.store.locked():
                self.store.save(new)
            self.enrollments = new
            if workload is not None and path.exists():
                await asyncio.to_thread(self.backend.remove, path)
            await self._send_to_proxies(DelWorkload(str(path)))
            self.certificates.pop(str(path), None)
            await self._publish_directory()
        log.info("unenrolled %s", netns_arg)
        return {"ok": True}

    # -------------------------------------------------------------- reconcile
    def _observe_one(self, workload: Workload) -> Observation:
        try:
            inode = netns_inode(workload.netns)
        except OSError:
            return Observation(None, "unknown")
        if inode != workload.netns_inode:
            return Observation(inode, "unknown")
        report = self.backend.inspect(Path(workload.netns))
        return Observation(inode, report.state, report.missing + report.unexpected)

    def _declared(self) -> dict[str, WorkloadSpec]:
        declared: dict[str, WorkloadSpec] = {}
        for spec in self.config.workloads:
            try:
                declared[str(resolve_netns(spec.netns))] = spec
            except NetnsError:
                continue
        return declared

    async def reconcile(self) -> list[str]:
        """Observe every workload (one at a time, without holding the enrollment lock, so an
        enrollment waits for at most one read-back), then act under the lock on what is still
        the same workload."""
        snapshot = dict(self.enrollments)
        observed = {
            uid: await asyncio.to_thread(self._observe_one, workload)
            for uid, workload in snapshot.items()
        }
        declared = await asyncio.to_thread(self._declared)
        async with self._mutate:
            unchanged = {uid: w for uid, w in self.enrollments.items() if snapshot.get(uid) == w}
            fresh = {path: spec for path, spec in declared.items() if path not in self.enrollments}
            actions = plan_reconcile(unchanged, observed, fresh)
            done = [await self._perform(action) for action in actions]
        report = [line for line in done if line]
        self.last_reconcile = {"at": time.time(), "actions": report}
        for line in report:
            log.info("reconcile: %s", line)
        return report

    async def _perform(self, action: ReconcileAction) -> str:
        try:
            match action:
                case Forget(workload=w):
                    self.enrollments = {k: v for k, v in self.enrollments.items() if k != w.uid}
                    with self.store.locked():
                        self.store.save(self.enrollments)
                    await self._send_to_proxies(DelWorkload(w.uid))
                    self.certificates.pop(w.uid, None)
                    await self._publish_directory()
                case Repair(workload=w):
                    await asyncio.to_thread(self.backend.apply, Path(w.netns))
                case EnrollDeclared(spec=spec):
                    workload = make_workload(spec.netns, spec.namespace, spec.service_account)
                    ips = await asyncio.to_thread(self.executor.call, workload.netns, pod_addresses)
                    workload = replace(workload, ips=ips)
                    self.enrollments = plan_enroll(self.enrollments, workload)
                    with self.store.locked():
                        self.store.save(self.enrollments)
                    await self._add_everywhere(workload)
                    await asyncio.to_thread(self.backend.apply, Path(workload.netns))
                    await self._publish_directory()
        except Exception as exc:  # retried on the next tick
            log.error("reconcile: %s failed: %s", describe(action), exc)
            return f"FAILED: {describe(action)}: {exc}"
        return describe(action)

    # ------------------------------------------------------------------ admin
    async def handle(self, body: dict[str, Any]) -> Reply:
        op = body.get("op")
        try:
            if op == "enroll":
                workload = await asyncio.to_thread(
                    make_workload,
                    str(body.get("netns", "")),
                    str(body.get("namespace", "")),
                    str(body.get("service_account", "")),
                    None if body.get("mode") is None else str(body["mode"]),
                )
                return await self.enroll(workload)
            if op == "unenroll":
                return await self.unenroll(str(body.get("netns", "")))
            if op == "reconcile":
                return {"ok": True, "actions": await self.reconcile()}
            if op == "status":
                return self.status()
        except (EnrollmentError, NetnsError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def status(self) -> Reply:
        return {
            "ok": True,
            "version": __version__,
            "pid": os.getpid(),
            "node": self.config.node_name,
            "backend": self.config.redirection.backend,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "proxies": [
                {"pid": p.hello.pid, "version": p.hello.proxy_version, "since": p.connected_at}
                for p in self.proxies
            ],
            "workloads": sorted(self.enrollments),
            "last_reconcile": self.last_reconcile,
            "identity": {
                "enabled": self.signer is not None,
                "trust_domain": self.config.identity.trust_domain,
                "node_certificate_expires": (
                    self.signer.not_after.timestamp() if self.signer is not None else None
                ),
                "certificates": {
                    uid: {
                        "spiffe_id": cert.spiffe_id,
                        "serial": f"{cert.serial:x}",
                        "not_before": cert.not_before.timestamp(),
                        "not_after": cert.not_after.timestamp(),
                    }
                    for uid, cert in self.certificates.items()
                },
            },
            "modes": {uid: self._mode(w) for uid, w in self.enrollments.items()},
            "directory": {"folder": str(self.directory_folder), "entries": len(self.directory)},
        }

    # -------------------------------------------------------------------- run
    async def run(self) -> None:
        prepare_state_dir(self.state_dir)
        self.signer = load_signer(self.config, self.state_dir)
        with self.store.locked():
            self.enrollments = self.store.load()
        await self._fill_addresses()
        await self._publish_directory()
        admin = await serve_async(self.state_dir / AGENT_SOCKET, self.handle)
        control = self._listen_control()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        tasks = [
            asyncio.create_task(self._accept_proxies(control), name="accept-proxies"),
            asyncio.create_task(self._reconcile_forever(), name="reconcile"),
            asyncio.create_task(self._identity_forever(), name="identity"),
        ]
        log.info(
            "agent %s on node %s: state dir %s, %d enrolled workload(s)",
            __version__,
            self.config.node_name,
            self.state_dir,
            len(self.enrollments),
        )
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in [stop, *tasks]:
            task.cancel()
        for task in done:
            if task is not stop and not task.cancelled() and task.exception():
                log.error("agent task %s died: %s", task.get_name(), task.exception())
        admin.close()
        control.close()
        for link in list(self.proxies):
            self._drop(link)
        for name in (AGENT_SOCKET, CONTROL_SOCKET):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()
        log.info("agent stopped; redirection stays in place (fail closed while no proxy runs)")

    def _listen_control(self) -> socket.socket:
        path = self.state_dir / CONTROL_SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        return sock

    async def _accept_proxies(self, control: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        handlers: set[asyncio.Task[None]] = set()
        while True:
            conn, _ = await loop.sock_accept(control)
            task = asyncio.create_task(self._on_proxy(conn), name="proxy-link")
            handlers.add(task)
            task.add_done_callback(handlers.discard)

    async def _fill_addresses(self) -> None:
        """Workloads recorded while the agent was down have no addresses yet: read them."""
        for uid, workload in list(self.enrollments.items()):
            if workload.ips:
                continue
            try:
                ips = await asyncio.to_thread(self.executor.call, workload.netns, pod_addresses)
            except (OSError, NetnsError):
                continue  # gone: the first reconcile forgets it
            self.enrollments[uid] = replace(workload, ips=ips)
        with self.store.locked():
            self.store.save(self.enrollments)

    async def _identity_forever(self) -> None:
        """Renew certificates at half-life and follow the shared directory, once a second."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._identity_tick()
            except Exception:  # retried on the next tick; the agent keeps running
                log.exception("certificate renewal / directory refresh failed")

    async def _identity_tick(self) -> None:
        async with self._mutate:
            now = dt.datetime.now(dt.UTC)
            for workload in list(self.enrollments.values()):
                current = self.certificates.get(workload.uid)
                if current is not None and renewal_due(current, now):
                    cert = self._certificate(workload, renew=True)
                    assert cert is not None
                    await self._send_to_proxies(self._certificate_message(workload.uid, cert))
            await self._refresh_directory()

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # e.g. a netns vanished mid-check: the next tick sees it gone
                log.exception("reconcile failed")
            await asyncio.sleep(self.config.agent.reconcile_interval)


def resolve_name(netns_arg: str) -> Path:
    """The path an enrolled netns name stands for, even when the namespace is already gone."""
    return NETNS_RUN_DIR / netns_arg


def run_agent(config: Config, state_dir: Path) -> None:
    try:
        asyncio.run(Agent(config, state_dir).run())
    except IdentityError as exc:
        raise SystemExit(f"agent: node credentials are unusable: {exc}") from exc
