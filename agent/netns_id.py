"""A network namespace's identity, and how to read it from a path (no sockets, no netlink).

`NetnsId` is the device and inode of a namespace's nsfs file: every path to one namespace
(`/var/run/netns/<name>`, `/proc/<pid>/ns/net`, a bind mount elsewhere) stats to the same pair,
and a namespace deleted and created again under the same name gets a new one.  Enrollment is
keyed by it (`NetnsId.uid`), never by a path.  `netns_path` maps what an operator types (an
`ip netns` name or a path) to a path; `current_id` and `nsfs_device` read identities with a
`stat`.  Kept apart from `agent.netns` (which enters namespaces) so the pure enrollment decisions
can name namespaces without loading anything that touches the kernel's network stack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NETNS_RUN_DIR = Path("/var/run/netns")


@dataclass(frozen=True, order=True)
class NetnsId:
    """A network namespace's identity: the device and inode of its nsfs file."""

    dev: int
    inode: int

    @property
    def uid(self) -> str:
        """The enrollment uid of the namespace, e.g. `netns-4-4026532281`."""
        return f"netns-{self.dev}-{self.inode}"


def netns_path(name_or_path: str) -> Path:
    """`web` means /var/run/netns/web (`ip netns` names); anything with a '/' is a path."""
    return Path(name_or_path) if "/" in name_or_path else NETNS_RUN_DIR / name_or_path


def current_id(path: Path | str) -> NetnsId | None:
    """The identity of the namespace at `path` now; None when there is none (gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return NetnsId(st.st_dev, st.st_ino)


def nsfs_device() -> int:
    """The device number every network namespace file has (the kernel's one nsfs)."""
    return os.stat("/proc/self/ns/net").st_dev
