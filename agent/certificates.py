"""Workload certificates on the agent: minted at enrollment, renewed at half-life, forgotten.

`Certificates` holds the node's signer and the current certificate of every enrolled workload
(by uid).  `load` reads the node's credentials (`agent ca issue-node`, in
`identity.node_credentials` or `<state-dir>/identity`) when the agent starts: that is the only
place `cryptography` is imported (through `agent.identity.certs`), so the CLI's enroll, unenroll
and status never load it.  Without credentials there is no signer: the mesh is plaintext and
every method here is a no-op that returns None.  With `identity.ca_url` (Kubernetes) the signer
is `agent.identity.ca_client.CaClient`: the same folder then holds only `bundle.pem`, and every
certificate is signed by the CA service from a CSR, for a pod of this node that `find_pod` names
(set by the agent from its pod watch).

`issue` mints a workload's certificate when it has none, when its current one is due (half its
lifetime, `agent.identity.certs.renewal_due`) or when asked to renew; `due` lists the workloads
whose certificate must be renewed now; `forget` drops one at unenrollment.  The results are the
control-protocol messages (`WorkloadCertificate`, `TrustBundle`): sending them to the proxies is
the proxy hub's job.  Private keys stay in memory and in those messages, never in a log.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import IdentityConfig
from agent.control.protocol import TrustBundle, WorkloadCertificate
from agent.identity.spiffe import IdentityError
from agent.workloads import Workload

if TYPE_CHECKING:
    from agent.identity.certs import WorkloadCertificate as Minted

log = logging.getLogger("ferry.agent")
RETRY_MAX = 60.0  # seconds between attempts for a workload whose certificate the signer refused


class Signer(Protocol):
    """What the agent needs of `agent.identity.certs.NodeSigner`."""

    bundle_pem: bytes

    @property
    def not_after(self) -> dt.datetime: ...

    def mint(
        self, namespace: str, service_account: str, ttl_seconds: float, now: dt.datetime
    ) -> Minted: ...


FindPod = Callable[[str, str], "tuple[str, str] | None"]


def load_ca_client(identity: IdentityConfig, state_dir: Path, find_pod: FindPod | None) -> Signer:
    """The CA service's client (`identity.ca_url`): no signing key on this node."""
    from agent.identity.ca_client import CaClient  # cryptography: only in the running agent

    if find_pod is None:
        raise IdentityError(
            f"identity.ca_url {identity.ca_url!r} needs kubernetes.enabled: true (the CA service "
            "signs only for pods scheduled on this node)"
        )
    folder = Path(identity.node_credentials or state_dir / "identity")
    return CaClient(identity.ca_url, folder / "bundle.pem", Path(identity.token_file),
                    identity.trust_domain, find_pod)  # fmt: skip


def load_node_signer(identity: IdentityConfig, state_dir: Path) -> Signer | None:
    """The node's signing credentials; None (plaintext mesh) when there are none at all."""
    folder = Path(identity.node_credentials or state_dir / "identity")
    if not folder.exists():
        log.warning(
            "no node credentials in %s: workloads get no certificates and traffic stays "
            "plaintext (create them with `agent ca issue-node`)",
            folder,
        )
        return None
    from agent.identity.certs import NodeSigner  # cryptography: only in the running agent

    return NodeSigner.load(folder, identity.trust_domain)


class Certificates:
    def __init__(
        self,
        identity: IdentityConfig,
        state_dir: Path,
        loader: Callable[[IdentityConfig, Path], Signer | None] = load_node_signer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.state_dir = state_dir
        self.loader = loader
        self.signer: Signer | None = None
        self.current: dict[str, Minted] = {}
        self.find_pod: FindPod | None = None
        self.failures: dict[str, str] = {}  # uid -> why its last (re)issue failed
        self.attempts: dict[str, int] = {}  # uid -> failed attempts in a row
        self.retry_at: dict[str, float] = {}  # uid -> when to ask again (clock)
        self.clock = clock

    def load(self) -> None:
        if self.identity.ca_url:
            self.signer = load_ca_client(self.identity, self.state_dir, self.find_pod)
        else:
            self.signer = self.loader(self.identity, self.state_dir)

    def trust(self) -> TrustBundle | None:
        if self.signer is None:
            return None
        return TrustBundle(self.identity.trust_domain, self.signer.bundle_pem.decode())

    def issue(
        self, workload: Workload, renew: bool = False, now: dt.datetime | None = None
    ) -> WorkloadCertificate | None:
        """The workload's certificate message, minted (again) when missing, due or asked."""
        if self.signer is None:
            return None
        now = now or dt.datetime.now(dt.UTC)
        cert = self.current.get(workload.uid)
        if cert is None or renew or _due(cert, now):
            cert = self.signer.mint(
                workload.namespace, workload.service_account, self.identity.workload_cert_ttl, now
            )
            self.current[workload.uid] = cert
            for failed in (self.failures, self.attempts, self.retry_at):
                failed.pop(workload.uid, None)
            log.info(
                "issued certificate for %s (%s), serial %x, expires %s",
                workload.name,
                cert.spiffe_id,
                cert.serial,
                cert.not_after.isoformat(),
            )
        return message(workload.uid, cert)

    def issue_or_keep(self, workload: Workload) -> WorkloadCertificate | None:
        """`issue` for a proxy's snapshot: when the signer fails (the CA service unreachable or
        refusing), the certificate the workload has (None without one) and the failure logged;
        the identity loop asks again (`due`).  A CA outage never keeps a proxy from its snapshot."""
        try:
            return self.issue(workload)
        except IdentityError as exc:
            self._failed(workload, exc)
            cert = self.current.get(workload.uid)
            return None if cert is None else message(workload.uid, cert)

    def renew(self, workload: Workload, now: dt.datetime) -> WorkloadCertificate | None:
        """A fresh certificate for a workload `due` lists, or None (logged) if the signer fails."""
        try:
            return self.issue(workload, renew=True, now=now)
        except IdentityError as exc:
            self._failed(workload, exc)
            return None

    def _failed(self, workload: Workload, exc: IdentityError) -> None:
        if self.failures.get(workload.uid) != str(exc):  # once per reason, not every tick
            log.error("no certificate for %s: %s", workload.describe(), exc)
        self.failures[workload.uid] = str(exc)
        attempts = self.attempts.get(workload.uid, 0) + 1
        self.attempts[workload.uid] = attempts
        self.retry_at[workload.uid] = self.clock() + min(RETRY_MAX, 2.0**attempts)

    def due(self, workloads: Iterable[Workload], now: dt.datetime) -> list[Workload]:
        """The workloads whose certificate is due for renewal at `now`, or missing (a signer
        that failed before: asked again after 2, 4, 8 ... at most `RETRY_MAX` seconds, so a CA
        service that does not answer costs the agent one attempt per workload and interval)."""
        if self.signer is None:
            return []
        tick = self.clock()
        return [
            w
            for w in workloads
            if ((c := self.current.get(w.uid)) is None or _due(c, now))
            and self.retry_at.get(w.uid, 0.0) <= tick
        ]

    def forget(self, uid: str) -> None:
        for held in (self.current, self.failures, self.attempts, self.retry_at):
            held.pop(uid, None)

    def status(self) -> dict[str, Any]:
        """The `identity` part of the agent's status reply (no key material)."""
        return {
            "enabled": self.signer is not None,
            "trust_domain": self.identity.trust_domain,
            "node_certificate_expires": (
                self.signer.not_after.timestamp() if self.signer is not None else None
            ),
            "failures": dict(self.failures),
            "certificates": {
                uid: {
                    "spiffe_id": cert.spiffe_id,
                    "serial": f"{cert.serial:x}",
                    "not_before": cert.not_before.timestamp(),
                    "not_after": cert.not_after.timestamp(),
                }
                for uid, cert in self.current.items()
            },
        }


def message(uid: str, cert: Minted) -> WorkloadCertificate:
    return WorkloadCertificate(
        uid, cert.chain_pem.decode(), cert.key_pem.decode(), cert.not_after.timestamp()
    )


def _due(cert: Minted, now: dt.datetime) -> bool:
    from agent.identity.certs import renewal_due  # loaded already: a signer minted `cert`

    return renewal_due(cert, now)
