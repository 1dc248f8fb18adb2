"""Workloads and their enrollment: the data, the decisions, and the file that persists them.

On a standalone host a workload is a network namespace plus the identity it runs as (Kubernetes
namespace and service account).  Enrollment is the decision to steer that namespace's TCP traffic
through the node proxy.

A workload is keyed by its namespace's identity, not by a path: its uid is `NetnsId.uid`
(`netns-<nsfs device>-<inode>`, e.g. `netns-4-4026532281`), the same for every path that reaches
the namespace (`web`, `/proc/<pid>/ns/net`, a bind mount elsewhere).  The path it was enrolled by
is kept too (`netns`), to reach the namespace later, and so is the name the operator gave (`name`).
Its labels (Kubernetes-style, `agent.names.labels`) are what policy selectors match; they are a
sorted tuple of (key, value) pairs, immutable like the rest of the record, and a JSON object in
every encoding (`to_json`).

The decisions are pure functions over a mapping `uid -> Workload`:

- `check_request` refuses a bad namespace, service account, mode or label;
- `plan_enroll` refuses the host's own namespaces (given as data by the caller, see
  `agent.netns.host_namespaces`) and a namespace already enrolled under any path, naming the
  existing enrollment; it also lists stale records (another namespace was enrolled at the same
  path and is gone) for the caller to forget first;
- `find_enrollment` finds what `agent unenroll X` means: the namespace X reaches now, else the
  record named X (its namespace may be gone);
- `without` is the mapping after an unenrollment, and `reach` the path (if any) by which the
  unenrolled workload's namespace can still be entered to remove its redirection.

They return data or raise `EnrollmentError` with a message an operator can act on, so a bad
request changes nothing.

`EnrollmentStore` persists the mapping as JSON in the state dir (0600, written to a temporary file
and renamed, so a crash never leaves half a file), which is what makes enrollment survive agent
restarts.  Writers hold an exclusive `flock` on a sibling lock file.  The file is version 2.
Version 1 keyed workloads by their netns path and had no device number; `migrate_v1` rekeys such
records by (nsfs device, recorded inode) on load (the next save writes version 2).  Two v1
records of one namespace (the bug version 2 fixes) keep only the first by path.  Records written
before workloads had labels load with none.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from agent.names import InvalidName, dns_label
from agent.names import labels as checked_labels
from agent.netns_id import NetnsId, current_id, netns_path, nsfs_device

STORE_NAME = "enrollments.json"
STORE_VERSION = 2
Mode = Literal["permissive", "strict"]  # strict: only tunnelled, authenticated inbound
MODES: tuple[Mode, ...] = ("permissive", "strict")


class EnrollmentError(ValueError):
    """An enrollment request cannot be carried out; nothing was changed."""


class StoreError(EnrollmentError):
    """The enrollment store cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    netns: str
    netns_inode: int
    namespace: str
    service_account: str
    mode: Mode | None = None  # None: the namespace's or the default
    ips: tuple[str, ...] = ()  # the pod's addresses, read in its netns at enrollment
    netns_dev: int = 0
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key (`agent.names.labels`)

    @property
    def netns_id(self) -> NetnsId:
        return NetnsId(self.netns_dev, self.netns_inode)

    def identity(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def describe(self) -> str:
        """How messages name it: `'web' (shop/web)`."""
        return f"{self.name!r} ({self.namespace}/{self.service_account})"

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["ips"] = list(self.ips)
        body["labels"] = dict(self.labels)
        return body

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Workload:
        try:
            return cls(
                uid=str(raw["uid"]),
                name=str(raw["name"]),
                netns=str(raw["netns"]),
                netns_inode=int(raw["netns_inode"]),
                namespace=str(raw["namespace"]),
                service_account=str(raw["service_account"]),
                mode=parse_mode(raw.get("mode")),
                ips=tuple(str(ip) for ip in raw.get("ips", ())),
                netns_dev=int(raw.get("netns_dev", 0)),
                labels=checked_labels(raw.get("labels", {})),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # Overflow: int(inf)
            raise EnrollmentError(f"malformed workload record {raw!r:.200}: {exc}") from exc


Enrollments = dict[str, Workload]


@dataclass(frozen=True)
class EnrollPlan:
    """An accepted enrollment: the workload, and stale records to forget before it."""

    workload: Workload
    stale: tuple[Workload, ...] = ()

    def after(self, current: Mapping[str, Workload]) -> Enrollments:
        """The enrollments once the stale records are forgotten and the workload is added."""
        kept = {uid: w for uid, w in current.items() if w not in self.stale}
        return {**kept, self.workload.uid: self.workload}


def parse_mode(value: object) -> Mode | None:
    """A workload's own mode (None: none of its own), or `EnrollmentError` naming the value."""
    if value is None:
        return None
    for mode in MODES:
        if value == mode:
            return mode
    raise EnrollmentError(f"invalid mode {value!r}: must be one of {', '.join(MODES)}")


def check_request(
    namespace: str, service_account: str, mode: str | None, labels: Mapping[str, str] | None = None
) -> tuple[tuple[str, str], ...]:
    """Refuse a bad identity, mode or label, naming the value (pure); the labels, sorted."""
    try:
        dns_label("namespace", namespace)
        dns_label("service account", service_account)
        checked = checked_labels(dict(labels or {}))
    except InvalidName as exc:
        raise EnrollmentError(str(exc)) from None
    parse_mode(mode)
    return checked


def new_workload(
    path: Path,
    netns: NetnsId,
    namespace: str,
    service_account: str,
    mode: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Workload:
    """The workload a checked request describes, keyed by its namespace's identity."""
    checked = check_request(namespace, service_account, mode, labels)
    return Workload(
        uid=netns.uid,
        name=path.name,
        netns=str(path),
        netns_inode=netns.inode,
        namespace=namespace,
        service_account=service_account,
        mode=parse_mode(mode),
        netns_dev=netns.dev,
        labels=checked,
    )


def plan_enroll(
    current: Mapping[str, Workload], workload: Workload, forbidden: Mapping[NetnsId, str]
) -> EnrollPlan:
    """Accept `workload` or refuse it: never a host namespace, never a namespace twice."""
    what = forbidden.get(workload.netns_id)
    if what is not None:
        raise EnrollmentError(
            f"refusing to enroll network namespace {workload.name!r} ({workload.netns}): it is "
            f"{what}; redirecting it would capture all of the node's own TCP traffic"
        )
    existing = current.get(workload.uid)
    if existing is not None:
        same_path = "" if existing.netns == workload.netns else f" via {existing.netns}"
        raise EnrollmentError(
            f"network namespace {workload.name!r} is already enrolled as "
            f"{existing.namespace}/{existing.service_account} (as {existing.name!r}{same_path}, "
            f"uid {existing.uid}); run `agent unenroll {existing.name}` first to change its "
            "identity"
        )
    stale = tuple(w for w in current.values() if w.netns == workload.netns)
    return EnrollPlan(workload, stale)


def find_enrollment(
    current: Mapping[str, Workload], name_or_path: str, live: NetnsId | None
) -> Workload:
    """The enrollment `name_or_path` means: the namespace it reaches now (`live`), else the one
    record enrolled under that name or path (its namespace may be gone)."""
    if live is not None and live.uid in current:
        return current[live.uid]
    path = str(netns_path(name_or_path))
    named = [w for w in current.values() if w.netns == path or w.name == name_or_path]
    if not named:
        raise EnrollmentError(f"network namespace {name_or_path!r} is not enrolled")
    if len(named) > 1:
        listed = ", ".join(f"{w.uid} ({w.netns})" for w in sorted(named, key=lambda w: w.uid))
        raise EnrollmentError(
            f"{name_or_path!r} names several enrollments ({listed}); unenroll one by its path"
        )
    return named[0]


def without(current: Mapping[str, Workload], uid: str) -> Enrollments:
    """The enrollments after removing `uid`."""
    return {k: v for k, v in current.items() if k != uid}


def reach(workload: Workload, given: Path | None, given_id: NetnsId | None) -> Path | None:
    """A path that reaches the workload's own namespace now, if any: the one the operator gave
    (when it is that namespace), else the recorded one (if it still is).  Stats the recorded
    path: a name may meanwhile stand for another namespace, which must not be touched."""
    if given is not None and given_id == workload.netns_id:
        return given
    recorded = Path(workload.netns)
    return recorded if current_id(recorded) == workload.netns_id else None


def migrate_v1(records: Iterable[Workload], nsfs_dev: int) -> Enrollments:
    """Version 1 records (uid = netns path) rekeyed by namespace identity (pure)."""
    migrated: Enrollments = {}
    for record in sorted(records, key=lambda w: w.netns):
        workload = replace(
            record, netns_dev=nsfs_dev, uid=NetnsId(nsfs_dev, record.netns_inode).uid
        )
        migrated.setdefault(workload.uid, workload)
    return migrated


class EnrollmentStore:
    """The persisted enrollments of one node (one state dir)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STORE_NAME
        self.tmp_path = self.path.with_suffix(".tmp")
        self._lock_path = state_dir / (STORE_NAME + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot lock {self._lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def load(self) -> Enrollments:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise StoreError(f"cannot read enrollments from {self.path}: {exc}") from exc
        version = raw.get("version") if isinstance(raw, dict) else None
        if version not in (1, STORE_VERSION):
            raise StoreError(
                f"{self.path} has version {version!r}; this agent reads versions 1 and "
                f"{STORE_VERSION}"
            )
        records = raw.get("workloads", [])
        if not isinstance(records, list):
            raise StoreError(f"{self.path}: workloads is {records!r:.80}, not a list")
        workloads = [Workload.from_json(item) for item in records]
        if version == 1:
            return migrate_v1(workloads, nsfs_device())
        return {w.uid: w for w in workloads}

    def save(self, enrollments: Mapping[str, Workload]) -> None:
        body = json.dumps(
            {
                "version": STORE_VERSION,
                "workloads": [w.to_json() for w in enrollments.values()],
            },
            indent=2,
        )
        try:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(self.tmp_path, self.path)
        except OSError as exc:
            raise StoreError(
                f"cannot save enrollments to {self.path}: {exc.strerror or exc}"
            ) from exc
