"""The process scan (agent.kube.scan) on real processes in network namespaces and cgroups.

Each pod is a `PodSandbox` (tests/integration/kube_pods.py): a pinned netns, a cgroup in the
kubelet's layout (systemd or cgroupfs driver) and a `sleep` in both.  The scan must find each
pod's namespace by its UID, prefer the pinned path (it outlives the process), fall back to
/proc/<pid>/ns/net, and skip a pod in the host's network namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.kube.scan import scan
from agent.netns_id import current_id
from tests.integration.kube_pods import PodSandbox


@pytest.fixture
def make_pod(privileged: None) -> Iterator[Callable[..., PodSandbox]]:
    made: list[PodSandbox] = []

    def make(**kwargs: object) -> PodSandbox:
        sandbox = PodSandbox(**kwargs)  # type: ignore[arg-type]
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.remove()


def test_the_scan_finds_each_pods_namespace_by_its_uid(make_pod: Callable[..., PodSandbox]) -> None:
    systemd = make_pod(driver="systemd", qos="burstable")
    cgroupfs = make_pod(driver="cgroupfs")
    host = make_pod(host_network=True)
    found = scan({systemd.uid, cgroupfs.uid, host.uid, "0f3c5b1e-0000-4c61-9b8e-2a6f4d9c1e07"})
    assert set(found) == {systemd.uid, cgroupfs.uid}  # the hostNetwork pod is not there
    for sandbox in (systemd, cgroupfs):
        ref = found[sandbox.uid]
        assert ref.path == sandbox.netns_path  # pinned: it outlives the process
        netns = current_id(sandbox.netns_path)
        assert netns is not None and ref.uid == netns.uid
        assert ref.source == "scan"
    assert set(scan({systemd.uid})) == {systemd.uid}  # only what is asked for


def test_an_unpinned_namespace_is_reached_through_the_process(
    make_pod: Callable[..., PodSandbox],
) -> None:
    sandbox = make_pod()
    netns = current_id(sandbox.netns_path)
    pinned = Path(sandbox.netns_path)
    assert sandbox.process is not None and netns is not None
    subprocess.run(["umount", str(pinned)], check=True)  # the pin is gone, the process is not
    pinned.unlink()
    ref = scan({sandbox.uid})[sandbox.uid]
    assert ref.path == f"/proc/{sandbox.process.pid}/ns/net"
    assert ref.uid == netns.uid
