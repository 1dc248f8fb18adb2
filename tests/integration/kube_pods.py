"""Pods as the kubelet leaves them on a node, without a kubelet: a netns, a cgroup, a process.

`PodSandbox` makes what `agent.kube.scan` looks for on a real node: a network namespace pinned
under /var/run/netns (as containerd pins `cni-<uuid>`), a cgroup named after the pod's UID in the
kubelet's layout (systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid
with _>.slice/cri-containerd-<id>.scope`; cgroupfs: `kubepods/<qos>/pod<uid>/<id>`) on the cgroup
v2 hierarchy, under a root of this test run's (`ferry-t<run>-...`), and a process (`sleep`) that
runs in both.  `remove` kills the process and removes the cgroups and the namespace; a pod made
here is always removed by its fixture, also when the test fails.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from pathlib import Path

from tests.run_id import NAME_PREFIX, netns_name

CGROUP2 = Path("/sys/fs/cgroup/unified")


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted here (a hybrid host: /sys/fs/cgroup/unified)."""
    for candidate in (CGROUP2, Path("/sys/fs/cgroup")):
        if (candidate / "cgroup.procs").exists() and (candidate / "cgroup.controllers").exists():
            return candidate
    raise AssertionError("cgroup v2 is not mounted (/sys/fs/cgroup/unified or /sys/fs/cgroup)")


class PodSandbox:
    def __init__(self, driver: str = "systemd", qos: str = "besteffort",
                 host_network: bool = False) -> None:  # fmt: skip
        self.uid = str(uuid.uuid4())
        self.netns = netns_name("pod")
        self.host_network = host_network
        self.root = cgroup2_root() / f"{NAME_PREFIX}{secrets.token_hex(3)}-kubepods"
        container = secrets.token_hex(6)
        if driver == "systemd":
            pod = f"kubepods-{qos}-pod{self.uid.replace('-', '_')}.slice"
            parts = ["kubepods.slice", f"kubepods-{qos}.slice", pod,
                     f"cri-containerd-{container}.scope"]  # fmt: skip
        else:
            parts = ["kubepods", qos, f"pod{self.uid}", container]
        self.cgroups = [self.root.joinpath(*parts[: i + 1]) for i in range(len(parts))]
        self.process: subprocess.Popen[bytes] | None = None
        try:
            if not host_network:
                subprocess.run(["ip", "netns", "add", self.netns], check=True)
                subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
            self.root.mkdir()
            for cgroup in self.cgroups:
                cgroup.mkdir()
            prefix = [] if host_network else ["ip", "netns", "exec", self.netns]
            self.process = subprocess.Popen([*prefix, "sleep", "600"])
            (self.cgroups[-1] / "cgroup.procs").write_text(str(self.process.pid))
        except BaseException:
            self.remove()
            raise

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def remove(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for cgroup in reversed([self.root, *self.cgroups]):
            deadline = time.monotonic() + 5
            while cgroup.exists():
                try:
                    cgroup.rmdir()
                except OSError:  # the killed process is still leaving it
                    assert time.monotonic() < deadline, f"cannot remove cgroup {cgroup}"
                    time.sleep(0.01)
        if not self.host_network and os.path.exists(self.netns_path):
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
