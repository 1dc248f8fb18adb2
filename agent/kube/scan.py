"""The network namespaces of pods that run already, from the processes on the node.

Pods started while the agent ran are reported by the CNI plugin with their netns path; pods that
existed before it (or before Ferry was installed) are found here: every process (psutil) whose
`/proc/<pid>/cgroup` names a pod (`agent.kube.cgroups.pod_uid`) reaches that pod's network
namespace at `/proc/<pid>/ns/net`.  A path that outlives the process is preferred: the runtime
pins each sandbox's namespace under /var/run/netns (containerd: `cni-<uuid>`), so the pinned
path with the same namespace identity is used when there is one.  Processes in the host's
network namespace (PID 1's, or the agent's own) are skipped: a hostNetwork pod is never
enrolled.  The agent needs the host's PID namespace for this (the DaemonSet's `hostPID: true`).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import psutil

from agent.kube.cgroups import pod_uid
from agent.kube.pods import NetnsRef
from agent.netns import host_namespaces
from agent.netns_id import NetnsId, current_id

PINNED_DIRS = (Path("/var/run/netns"), Path("/run/netns"))


def pinned_namespaces(dirs: Collection[Path] = PINNED_DIRS) -> dict[NetnsId, Path]:
    """Namespace identity -> a pinned path to it (the first found)."""
    pinned: dict[NetnsId, Path] = {}
    for directory in dirs:
        try:
            entries = sorted(directory.iterdir())
        except OSError:
            continue
        for entry in entries:
            found = current_id(entry)
            if found is not None:
                pinned.setdefault(found, entry)
    return pinned


def scan(wanted: Collection[str] | None = None, proc: Path = Path("/proc")) -> dict[str, NetnsRef]:
    """Pod UID -> where its network namespace is, for the pods in `wanted` (None: all)."""
    host = set(host_namespaces())
    pinned: dict[NetnsId, Path] | None = None
    found: dict[str, NetnsRef] = {}
    for pid in psutil.pids():
        try:
            uid = pod_uid((proc / str(pid) / "cgroup").read_text())
        except OSError:  # gone meanwhile
            continue
        if uid is None or uid in found or (wanted is not None and uid not in wanted):
            continue
        path = proc / str(pid) / "ns" / "net"
        netns = current_id(path)
        if netns is None or netns in host:
            continue
        if pinned is None:
            pinned = pinned_namespaces()
        found[uid] = NetnsRef(str(pinned.get(netns, path)), netns.uid, "scan")
    return found
