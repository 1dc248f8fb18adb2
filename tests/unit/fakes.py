"""Recording fakes for the agent's parts: enrollment order and rollback tested without a kernel.

Every fake writes what it is asked to do into one shared `Journal`, in order, so a test reads the
whole story of an enrollment ("store.save", "hub.add", "certs.mint", ...).  A journal can be told
to fail one operation, once (`Journal(fail="backend.apply")`): that call is recorded as
"backend.apply FAILED" and raises `InjectedFailure`, an exception none of the parts expects, like
a full disk or a bug would.  The fakes keep the state a real part would (which namespaces have
rules, which workloads and certificates the proxies hold, what was published), so a test can
check that a rollback left nothing behind.

`FakeNode` stands in for the node's namespaces with plain files (a name's identity is its file's
device and inode); "host" is the node's own namespace, which the enrollment must refuse.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from pathlib import Path

from agent.certificates import Certificates
from agent.config import Config, IdentityConfig, MeshConfig, WorkloadSpec
from agent.control.protocol import ProtocolError, WorkloadCertificate
from agent.enrollment import Enrollment
from agent.identity.certs import WorkloadCertificate as Minted
from agent.netns import NetnsError
from agent.netns_id import NetnsId
from agent.publishing import DirectoryChange
from agent.redirect.rules import RedirectionReport
from agent.workloads import EnrollmentStore, Workload


class InjectedFailure(RuntimeError):
    """The failure a test asked for."""


class Journal:
    def __init__(self, fail: str | None = None) -> None:
        self.entries: list[str] = []
        self.fail = fail

    def __call__(self, op: str) -> None:
        if op == self.fail:
            self.fail = None
            self.entries.append(f"{op} FAILED")
            raise InjectedFailure(f"{op} failed (injected)")
        self.entries.append(op)


class FakeBackend:
    """A `RedirectionBackend` that remembers which namespaces (by identity, whatever path
    reached them) hold Ferry's rules."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.installed_in: set[NetnsId] = set()

    def apply(self, netns: Path) -> None:
        self.journal("backend.apply")
        self.installed_in.add(_identity(netns))

    def remove(self, netns: Path) -> None:
        self.journal("backend.remove")
        self.installed_in.discard(_identity(netns))

    def inspect(self, netns: Path) -> RedirectionReport:
        return RedirectionReport("ok" if self.installed(netns) else "missing")

    def installed(self, netns: Path) -> bool:
        return _identity(netns) in self.installed_in


def _identity(netns: Path) -> NetnsId:
    st = netns.stat()
    return NetnsId(st.st_dev, st.st_ino)


class FakeHub:
    """The proxies as the agent sees them: what they were handed, in the protocol's rules."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.workloads: dict[str, str] = {}  # uid -> mode
        self.certificates: dict[str, WorkloadCertificate] = {}
        self.directories: list[DirectoryChange] = []

    async def add_workload(self, workload: Workload, mode: str) -> int:
        self.journal("hub.add")
        self.workloads[workload.uid] = mode
        return 1

    async def del_workload(self, uid: str) -> int:
        self.journal("hub.del")
        self.workloads.pop(uid, None)
        self.certificates.pop(uid, None)
        return 1

    async def send_certificate(self, certificate: WorkloadCertificate) -> int:
        if certificate.uid not in self.workloads:  # what `ProxySession` would refuse
            raise ProtocolError(f"certificate for {certificate.uid!r} before its workload")
        self.journal("hub.cert")
        self.certificates[certificate.uid] = certificate
        return 1

    async def send_directory(self, change: DirectoryChange) -> int:
        self.directories.append(change)
        return 1


class FakePublisher:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.published: list[str] = []  # the uids in this node's file

    async def publish(self, enrollments: Mapping[str, Workload]) -> None:
        self.journal("publish")
        self.published = sorted(enrollments)


class FakeSigner:
    bundle_pem = b"BUNDLE"
    not_after = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def mint(
        self, namespace: str, service_account: str, ttl_seconds: float, now: dt.datetime
    ) -> Minted:
        self.journal("certs.mint")
        return Minted(
            spiffe_id=f"spiffe://cluster.local/ns/{namespace}/sa/{service_account}",
            chain_pem=b"CHAIN",
            key_pem=b"KEY",
            not_before=now,
            not_after=now + dt.timedelta(seconds=ttl_seconds),
            serial=1,
        )


class RecordingStore(EnrollmentStore):
    def __init__(self, state_dir: Path, journal: Journal) -> None:
        super().__init__(state_dir)
        self.journal = journal

    def save(self, enrollments: Mapping[str, Workload]) -> None:
        self.journal("store.save")
        super().save(enrollments)


class FakeNode:
    """Network namespaces stood in for by plain files under `root`: a name resolves to its file
    and its identity is the file's (device, inode), so `current_id` and `reach` see them come and
    go like namespaces.  `host` is the node's own namespace; `alias` is another path to one."""

    def __init__(self, root: Path, *names: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for name in (*names, "host"):
            (root / name).touch()

    def resolve(self, name: str) -> tuple[Path, NetnsId]:
        path = self.root / name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NetnsError(f"network namespace {name!r} does not exist") from None
        return path, NetnsId(st.st_dev, st.st_ino)

    def alias(self, name: str, of: str) -> None:
        os.link(self.root / of, self.root / name)

    def delete(self, name: str) -> None:
        (self.root / name).unlink()

    def recreate(self, name: str) -> None:
        """A new namespace under an old name (made while the old one exists: a new inode)."""
        fresh = self.root / f".{name}.new"
        fresh.touch()
        os.replace(fresh, self.root / name)

    def forbidden(self) -> dict[NetnsId, str]:
        return {self.resolve("host")[1]: "the network namespace the agent itself runs in"}

    @staticmethod
    def addresses(netns: Path) -> tuple[str, ...]:
        return ("10.0.0.2",)


class Parts:
    """An `Enrollment` made of fakes, with everything a test wants to look at."""

    def __init__(self, state_dir: Path, journal: Journal, node: FakeNode) -> None:
        self.journal = journal
        self.node = node
        self.backend = FakeBackend(journal)
        self.hub = FakeHub(journal)
        self.publisher = FakePublisher(journal)
        self.store = RecordingStore(state_dir, journal)
        self.certificates = Certificates(
            IdentityConfig(), state_dir, loader=lambda _identity, _dir: FakeSigner(journal)
        )
        self.certificates.load()
        self.enrollment = Enrollment(
            self.store,
            self.hub,
            self.certificates,
            self.backend,
            self.publisher,
            MeshConfig(),
            node.addresses,
            resolve=node.resolve,
            forbidden=node.forbidden,
        )


def config_with(*declared: tuple[str, str, str]) -> Config:
    return Config(node_name="node-a", workloads=tuple(WorkloadSpec(*spec) for spec in declared))
