"""Finding the host's cgroup v2 root from mountinfo and cgroup texts (agent.redirect.cgroup_root).

The texts are recorded: a hybrid host (this test machine), a unified host (systemd, Debian 12),
a container of a cgroup v2 node with its own cgroup namespace (containerd), with and without the
host's /sys/fs/cgroup mounted in (hostPath), and a process of this machine after
`unshare --cgroup --mount` in a child cgroup that mounted cgroup2 again over a tmpfs.
"""

from __future__ import annotations

import pytest

from agent.redirect.cgroup_root import (
    ancestor_steps,
    candidates,
    cgroup2_mounts,
    in_private_namespace,
)

HYBRID_HOST = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED_HOST = """\
22 26 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 21 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
27 21 0:25 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:6 - bpf bpf rw,mode=700
"""
CONTAINER = """\
1276 1180 0:120 / / ro,relatime - overlay overlay rw,lowerdir=/var/lib/containerd/l1
1284 1283 0:124 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
1285 1284 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
"""
CONTAINER_WITH_HOSTPATH = (
    CONTAINER
    + "1302 1285 0:23 /../../.. /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime master:4 - cgroup2 "
    "cgroup2 rw,nsdelegate,memory_recursiveprot\n"
)
UNSHARED_REMOUNTED = """\
261 149 0:38 /.. /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
313 149 0:55 / /sys/fs/cgroup rw,relatime - tmpfs none rw
314 313 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 none rw
"""
ESCAPED = "50 25 0:23 /../.. /host\\040cgroup rw - cgroup2 cgroup2 rw\n"


@pytest.mark.parametrize(
    ("init_cgroup", "private"),
    [
        ("0::/init.scope\n", False),  # a unified host, from the host
        ("9:name=systemd:/\n4:memory:/\n0::/\n", False),  # this hybrid machine, from the host
        ("0::/../../../init.scope\n", True),  # host init, seen from a pod's container
        ("0::/..\n", True),  # host init in the root cgroup, from a child namespace one deep
        ("4:memory:/\n1:cpu:/\n", False),  # cgroup v1 only: there is no v2 path
        ("0::/..hidden\n", False),  # a cgroup whose name starts with two dots
        ("", False),  # pid 1 unreadable
    ],
)
def test_private_namespace_is_told_by_the_host_init_path(init_cgroup: str, private: bool) -> None:
    assert in_private_namespace(init_cgroup) is private


@pytest.mark.parametrize(
    ("mountinfo", "private", "expected"),
    [
        (HYBRID_HOST, False, ["/sys/fs/cgroup/unified"]),
        (UNIFIED_HOST, False, ["/sys/fs/cgroup"]),
        # The container's own cgroup shows as "/" too: never the host's root from there.
        (CONTAINER, True, []),
        (CONTAINER_WITH_HOSTPATH, True, ["/sys/fs/cgroup"]),
        # The shadowed mount is still listed: the adapter checks it is a root (cgroup.type).
        (UNSHARED_REMOUNTED, True, ["/sys/fs/cgroup/unified"]),
        (UNSHARED_REMOUNTED, False, ["/sys/fs/cgroup/unified"]),
        (ESCAPED, True, ["/host cgroup"]),
        (HYBRID_HOST + ESCAPED, True, ["/host cgroup"]),
        (UNIFIED_HOST.replace("cgroup2", "cgroup"), False, []),
    ],
)
def test_candidates(mountinfo: str, private: bool, expected: list[str]) -> None:
    assert candidates(mountinfo, private) == expected


def test_candidates_put_the_highest_ancestor_first() -> None:
    mountinfo = (
        "60 25 0:23 /.. /mnt/parent rw - cgroup2 cgroup2 rw\n"
        "61 25 0:23 /../../.. /mnt/host rw - cgroup2 cgroup2 rw\n"
        "62 25 0:23 /../sibling /mnt/sibling rw - cgroup2 cgroup2 rw\n"
    )
    assert candidates(mountinfo, True) == ["/mnt/host", "/mnt/parent"]


@pytest.mark.parametrize(
    ("root", "steps"),
    [("/", 0), ("/..", 1), ("/../../..", 3), ("/../kubepods", None), ("/kubepods", None)],
)
def test_ancestor_steps(root: str, steps: int | None) -> None:
    assert ancestor_steps(root) == steps


def test_mounts_keep_their_order_and_skip_other_filesystems() -> None:
    mounts = cgroup2_mounts(CONTAINER_WITH_HOSTPATH)
    assert [(m.root, m.mount_point) for m in mounts] == [
        ("/", "/sys/fs/cgroup"),
        ("/../../..", "/sys/fs/cgroup"),
    ]
