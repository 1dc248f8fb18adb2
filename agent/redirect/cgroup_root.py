"""Where the host's cgroup v2 hierarchy root is, also from inside a container.

The eBPF backend attaches its connect hooks at the root of the cgroup v2 hierarchy, so that they
see every socket of the node.  A process in the host's (initial) cgroup namespace finds that root
as the cgroup2 mount whose root field in `/proc/self/mountinfo` is `/`.  A container on cgroup v2
usually has a cgroup namespace of its own, and there the runtime's mount at `/sys/fs/cgroup` also
shows `/`: but that `/` is the container's own cgroup, and hooks attached there would see only
the agent's own sockets.  The kernel shows cgroups outside the reader's namespace relative to it,
as `..` steps: the host's root mounted into the container (the eBPF DaemonSet's hostPath
`/sys/fs/cgroup`) shows as `/../../..`, and so does pid 1's cgroup in `/proc/1/cgroup` (the
DaemonSet runs with `hostPID`, so pid 1 is the host's init).

How: `in_private_namespace` says, from the host init's `/proc/1/cgroup`, whether this process
is in a namespace of its own (the init's cgroup v2 path starts with `/..`).  `candidates` lists
the mount points that may be the root, from a mountinfo text: in the host's namespace those with
root `/`; in a private one those whose root is only `..` steps, the most steps first.  Both are
pure.  `cgroup2_root` (the adapter) reads the files and takes the first candidate that really is
the root: in a private namespace its own mounts, then the host's mounts through
`/proc/1/root` (which needs CAP_SYS_PTRACE over pid 1).  cgroup v2 gives every cgroup but the
hierarchy's root a `cgroup.type` file (a namespace's root included), so neither a namespace's
root nor a mount shadowed by a later one is ever taken.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.redirect.rules import RedirectionError

PROC = Path("/proc")
_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Cgroup2Mount:
    """One cgroup2 line of a mountinfo: the cgroup shown at `mount_point` (`root`, relative to
    the reader's cgroup namespace)."""

    root: str
    mount_point: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)


def cgroup2_mounts(mountinfo: str) -> list[Cgroup2Mount]:
    """Every cgroup2 mount of a /proc/<pid>/mountinfo text, in its order."""
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if len(fields) > dash + 1 and fields[dash + 1] == "cgroup2":
            mounts.append(Cgroup2Mount(_unescape(fields[3]), _unescape(fields[4])))
    return mounts


def unified_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path of a /proc/<pid>/cgroup text (its `0::` line), None without one."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def in_private_namespace(init_cgroup: str) -> bool:
    """Whether the reader has a cgroup namespace of its own, from the host init's cgroup text:
    a cgroup outside the reader's namespace is shown with `..` steps."""
    path = unified_path(init_cgroup)
    return path is not None and (path == "/.." or path.startswith("/../"))


def ancestor_steps(root: str) -> int | None:
    """How many `..` steps a mount's root is made of (`/`: 0), None if it names a cgroup."""
    parts = [p for p in root.split("/") if p]
    if not root.startswith("/") or any(p != ".." for p in parts):
        return None
    return len(parts)


def candidates(mountinfo: str, private: bool) -> list[str]:
    """Mount points that may show the hierarchy's root, the likeliest first: root `/` in the
    host's namespace; in a private one, roots of only `..` steps, the most steps first (`/` is
    the namespace's own root there, never the host's)."""
    found = []
    for mount in cgroup2_mounts(mountinfo):
        steps = ancestor_steps(mount.root)
        if steps is not None and (steps > 0) == private:
            found.append((steps, mount.mount_point))
    return [point for _, point in sorted(found, key=lambda f: -f[0])]


def is_hierarchy_root(path: Path) -> bool:
    """A cgroup v2 directory without `cgroup.type`, which every cgroup but the root has."""
    return os.path.exists(path / "cgroup.procs") and not os.path.lexists(path / "cgroup.type")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def cgroup2_root(host_pid: int = 1) -> Path:
    """The host's cgroup v2 root, seen from this process (`host_pid`: a process in the host's
    cgroup and mount namespaces, pid 1 with hostPID); raises `RedirectionError` saying why not."""
    host = PROC / str(host_pid)
    init_cgroup = _read(host / "cgroup")
    private = in_private_namespace(init_cgroup)
    paths = [Path(p) for p in candidates(_read(PROC / "self" / "mountinfo"), private)]
    if private:
        paths += [
            host / "root" / p.lstrip("/") for p in candidates(_read(host / "mountinfo"), private)
        ]
    for path in paths:
        if is_hierarchy_root(path):
            return path
    if private:
        raise RedirectionError(
            f"this process has a cgroup namespace of its own (pid {host_pid}'s cgroup is "
            f"{unified_path(init_cgroup)!r} from here) and none of "
            f"{[str(p) for p in paths] or 'its cgroup2 mounts'} is the host's cgroup v2 root; "
            "the eBPF backend attaches its connect hooks there: mount the host's /sys/fs/cgroup "
            "into the container (hostPath), or run with hostPID and CAP_SYS_PTRACE "
            f"(it looks in {host}/root)"
        )
    if paths:
        raise RedirectionError(
            f"the cgroup2 mounts {[str(p) for p in paths]} are not the hierarchy's root (they "
            "have cgroup.type): in a container with a cgroup namespace of its own, run with "
            "hostPID so that pid 1 is the host's init, and mount the host's /sys/fs/cgroup"
        )
    raise RedirectionError(
        "no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo); the eBPF backend "
        "attaches its connect hooks at its root: mount -t cgroup2 none /sys/fs/cgroup/unified"
    )
