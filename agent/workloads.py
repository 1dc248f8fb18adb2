"""Workloads and their enrollment: the data, the decisions, and the file that persists them.

On a standalone host a workload is a network namespace plus the identity it runs as (Kubernetes
namespace and service account).  Enrollment is the decision to steer that namespace's TCP traffic
through the node proxy.  The decisions are pure functions over a mapping `uid -> Workload`
(`plan_enroll`, `plan_unenroll`); they either return the new mapping or raise `EnrollmentError`
with a message an operator can act on, so a bad request changes nothing.

`EnrollmentStore` persists the mapping as JSON in the state dir (0600, written to a temporary file
and renamed, so a crash never leaves half a file), which is what makes enrollment survive agent
restarts.  Writers hold an exclusive `flock` on a sibling lock file.

A workload's uid is its netns path; the namespace inode is recorded too, so a namespace deleted and
created again under the same name is recognised as a different (not enrolled) one.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STORE_NAME = "enrollments.json"


class EnrollmentError(ValueError):
    """An enrollment request cannot be carried out; nothing was changed."""


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    netns: str
    netns_inode: int
    namespace: str
    service_account: str
    mode: str | None = None  # permissive | strict; None: the namespace's or the default
    ips: tuple[str, ...] = ()  # the pod's addresses, read in its netns at enrollment

    def identity(self, trust_domain: str = "cluster.local") -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["ips"] = list(self.ips)
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
                mode=None if raw.get("mode") is None else str(raw["mode"]),
                ips=tuple(str(ip) for ip in raw.get("ips", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EnrollmentError(f"malformed workload record {dict(raw)!r}: {exc}") from exc


Enrollments = dict[str, Workload]


def plan_enroll(current: Mapping[str, Workload], workload: Workload) -> Enrollments:
    """The enrollments after adding `workload`; refuses a netns that is already enrolled."""
    existing = current.get(workload.uid)
    if existing is not None and existing.netns_inode == workload.netns_inode:
        raise EnrollmentError(
            f"network namespace {workload.name!r} is already enrolled as "
            f"{existing.namespace}/{existing.service_account}; run `agent unenroll "
            f"{workload.name}` first to change its identity"
        )
    return {**current, workload.uid: workload}


def plan_unenroll(current: Mapping[str, Workload], uid: str, name: str) -> Enrollments:
    """The enrollments after removing `uid`; refuses one that is not enrolled."""
    if uid not in current:
        raise EnrollmentError(f"network namespace {name!r} is not enrolled")
    return {k: v for k, v in current.items() if k != uid}


class EnrollmentStore:
    """The persisted enrollments of one node (one state dir)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STORE_NAME
        self._lock_path = state_dir / (STORE_NAME + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        except (OSError, ValueError) as exc:
            raise EnrollmentError(f"cannot read enrollments from {self.path}: {exc}") from exc
        workloads = (Workload.from_json(item) for item in raw.get("workloads", []))
        return {w.uid: w for w in workloads}

    def save(self, enrollments: Mapping[str, Workload]) -> None:
        body = json.dumps(
            {"version": 1, "workloads": [w.to_json() for w in enrollments.values()]}, indent=2
        )
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
