"""Which pod a process belongs to, from its `/proc/<pid>/cgroup` (pure).

The kubelet puts every container of a pod under one cgroup named after the pod's UID, with the
QoS class in between, in one of two spellings depending on its cgroup driver:

    systemd:   /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/...
               (the UID's '-' written as '_', since '-' is the slice hierarchy separator;
               guaranteed pods sit right under kubepods.slice: kubepods-pod<uid>.slice)
    cgroupfs:  /kubepods/besteffort/pod<uid>/<container id>   (guaranteed: /kubepods/pod<uid>/)

Each line of the file is `hierarchy-id:controllers:path`: one line `0::<path>` on cgroup v2, one
line per v1 hierarchy on v1, both on a hybrid host; a container runtime's own cgroup namespace
may shorten the path, and kind/containerd-in-docker nest it under a prefix.  `pod_uid` therefore
looks at every line and every path component, and answers the first UID it finds (all lines of
one process name the same pod) as the API server writes it: lower-case, with dashes.
"""

from __future__ import annotations

import re

_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_SYSTEMD = re.compile(rf"^kubepods(?:-[a-z]+)?-pod({_UUID})\.slice$")
_CGROUPFS = re.compile(rf"^pod({_UUID})$")


def pod_uid(cgroup_file: str) -> str | None:
    """The pod UID in a `/proc/<pid>/cgroup` text, or None for a process in no pod."""
    for line in cgroup_file.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        components = parts[2].split("/")
        in_kubepods = False
        for component in components:
            lowered = component.lower()
            if lowered.startswith("kubepods"):
                in_kubepods = True
            if not in_kubepods:
                continue
            found = _SYSTEMD.match(lowered) or _CGROUPFS.match(lowered)
            if found:
                return found.group(1).replace("_", "-")
    return None
