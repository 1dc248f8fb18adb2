"""The eBPF backend finds the host's cgroup v2 root from a cgroup namespace of its own, for real.

A shell moves into a child cgroup of this run and `unshare --cgroup` makes that cgroup its
namespace's root, as a container runtime does; the agent's lookup (`cgroup2_root`) runs there:
- with the host's hierarchy still mounted (what the eBPF DaemonSet's hostPath /sys/fs/cgroup
  gives a pod), it is found in the process's own mounts;
- with a fresh cgroup2 mount in a new mount namespace (a container's own /sys/fs/cgroup, which
  shows as `/` but is the namespace's root), it is found through `/proc/<host pid>/root`.
In both the answer must be the very directory of the host's root (same device and inode), never
the child cgroup.  Pid 1 of this machine refuses /proc/1/root, so a `sleep` started in the host's
namespaces stands for the node's init (what `hostPID` gives the DaemonSet).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kube_pods import cgroup2_root as host_root
from tests.run_id import NAME_PREFIX

LOOKUP = (
    "import os, sys; from agent.redirect.cgroup_root import cgroup2_root; "
    "p = cgroup2_root(int(sys.argv[1])); s = os.stat(p); print(p, s.st_dev, s.st_ino)"
)


@pytest.fixture
def child_cgroup() -> Iterator[Path]:
    path = host_root() / f"{NAME_PREFIX}{secrets.token_hex(3)}-cgroupns"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


@pytest.fixture
def host_process() -> Iterator[int]:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        yield sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def lookup_in_namespace(cgroup: Path, host_pid: int, remount: bool) -> tuple[str, int, int]:
    mount = host_root()
    inner = f"{sys.executable} -c '{LOOKUP}' {host_pid}"
    if remount:  # a container's own cgroup mount, over a tmpfs in a mount namespace of its own
        inner = (
            f"mount -t tmpfs none {mount.parent} && mkdir -p {mount} && "
            f"mount -t cgroup2 none {mount} && test -e {mount}/cgroup.type && {inner}"
        )
        command = f'unshare --cgroup --mount --propagation private sh -c "{inner}"'
    else:
        command = f'unshare --cgroup sh -c "{inner}"'
    done = subprocess.run(
        ["sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && exec {command}"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr
    path, dev, ino = done.stdout.split()
    return path, int(dev), int(ino)


@pytest.mark.parametrize("remount", [False, True], ids=["host-mount", "own-mount"])
def test_host_root_is_found_from_a_private_cgroup_namespace(
    child_cgroup: Path, host_process: int, remount: bool
) -> None:
    path, dev, ino = lookup_in_namespace(child_cgroup, host_process, remount)
    root = os.stat(host_root())
    assert (dev, ino) == (root.st_dev, root.st_ino), f"{path} is not the host's cgroup v2 root"
    if remount:
        assert path == f"/proc/{host_process}/root{host_root()}"
    else:
        assert path == str(host_root())
