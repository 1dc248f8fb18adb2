"""Ferry on a simulated node: `agent run` and `agent proxy` as real processes in the node netns.

Used by the end-to-end tests, `make demo` and the benchmarks.  Each `FerryNode` has its own state
dir and config file under the node's temp dir, so several nodes (and test runs) share a machine.
Commands go through the real CLI (`python -m agent ...`), exactly as an operator would type them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sim.node import Pod, SimNode


class FerryError(RuntimeError):
    """A Ferry process did not start or a command failed unexpectedly."""


class FerryNode:
    def __init__(self, node: SimNode, workers: int = 1, config: dict[str, Any] | None = None):
        self.node = node
        self.workers = workers
        self.state_dir = node.tmpdir / "ferry-state"
        self.config_path = node.tmpdir / "ferry.yaml"
        self.write_config(config or {})
        self.agent: subprocess.Popen[Any] | None = None
        self.proxy: subprocess.Popen[Any] | None = None
        self.logs = node.tmpdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.upgrades = 0

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump({"node_name": self.node.name, **config}))

    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agent", *args]

    def _daemon(self, what: str, *args: str) -> subprocess.Popen[Any]:
        log = open(self.logs / f"{what}.log", "ab")  # noqa: SIM115 - owned by the process
        return self.node.popen(
            self._argv(
                what, "--state-dir", str(self.state_dir), "--config", str(self.config_path), *args
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_agent(self, *args: str) -> None:
        """`agent run` with the node's state dir and config, and `args` (e.g. --backend)."""
        self.agent = self._daemon("run", *args)
        self._wait_for(lambda: (self.state_dir / "agent.sock").exists(), "agent.sock", self.agent)

    def start_proxy(self) -> None:
        self.proxy = self._daemon("proxy", "--workers", str(self.workers))
        self._wait_for(lambda: (self.state_dir / "proxy.sock").exists(), "proxy.sock", self.proxy)

    def start(self) -> None:
        self.start_agent()
        self.start_proxy()
        self.wait_connected()

    def upgrade_proxy(self, env: Mapping[str, str] | None = None) -> subprocess.Popen[Any]:
        """`agent proxy --upgrade` (systemd's ExecReload), started: a new proxy takes over from
        the running one in the background; the command exits 0 once it serves, 1 when it could
        not (`upgrade_output` has what it said).  The new proxy logs to the same file, and runs
        in the node netns (the node's teardown ends it)."""
        self.upgrades += 1
        log = open(self.logs / f"proxy-upgrade-{self.upgrades}.log", "ab")  # noqa: SIM115
        with log:
            return self.node.popen(
                self._argv("proxy", "--upgrade", "--state-dir", str(self.state_dir), "--config",
                           str(self.config_path), "--workers", str(self.workers)),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )  # fmt: skip

    def upgrade_output(self) -> str:
        """What the last `upgrade_proxy` and the proxy it started wrote so far."""
        return (self.logs / f"proxy-upgrade-{self.upgrades}.log").read_text()

    def proxy_pid(self) -> int:
        """The pid of the proxy serving now (the one answering on proxy.sock)."""
        proxy = self.status()["proxy"]
        if not proxy.get("running"):
            raise FerryError(f"no proxy answers on {self.node.name}: {proxy}")
        return int(proxy["pid"])

    def wait_connected(self, timeout: float = 10.0) -> None:
        def connected() -> bool:
            proxy = self.status()["proxy"]
            return bool(proxy.get("running") and proxy.get("agent_connected"))

        self._wait_for(connected, "proxy connected to agent", None, timeout)

    def _wait_for(
        self, ready: Any, what: str, proc: subprocess.Popen[Any] | None, timeout: float = 10.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.02)
        logs = "\n".join(p.read_text()[-2000:] for p in sorted(self.logs.glob("*.log")))
        raise FerryError(f"timed out waiting for {what} on {self.node.name}\n{logs}")

    def stop(self, proc: subprocess.Popen[Any] | None, kill: bool = False) -> None:
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        proc.wait(10)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.node.exec(
            self._argv(*args, "--state-dir", str(self.state_dir)), timeout=60
        )
        if check and result.returncode != 0:
            raise FerryError(f"agent {' '.join(args)} failed: {result.stderr}{result.stdout}")
        return result

    def enroll(
        self,
        pod: Pod,
        namespace: str = "default",
        service_account: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """`agent enroll`; `labels` become `--label key=value` (what policy selectors match)."""
        flags = [arg for k, v in (labels or {}).items() for arg in ("--label", f"{k}={v}")]
        self.cli(
            "enroll",
            pod.netns,
            "--namespace",
            namespace,
            "--service-account",
            service_account,
            *flags,
            check=True,
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json", "--config", str(self.config_path))
        try:
            document: dict[str, Any] = json.loads(result.stdout)
        except ValueError as exc:
            raise FerryError(f"agent status --json printed no JSON: {result.stderr}") from exc
        return document

    def workload(self, pod: Pod) -> dict[str, Any]:
        for entry in self.status()["workloads"]:
            if entry["name"] == pod.netns:
                return dict(entry)
        raise FerryError(f"{pod.netns} is not in agent status")

    def log_text(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("*.log")))

    @property
    def state(self) -> Path:
        return self.state_dir


class Mesh:
    """Several Ferry nodes that trust one CA and share one directory folder.

    `agent ca init` makes the CA once; every node gets its own signing credentials from
    `agent ca issue-node` in `<state-dir>/identity` and publishes its workloads to the shared
    directory, exactly as an operator would set up standalone hosts.  Every node's agent watches
    one policy folder, `policies` (a fleet's central source; not created here: a missing folder
    is no policy), unless the node's config names another `policy.directory`.
    """

    def __init__(self, workdir: Path, trust_domain: str = "cluster.local") -> None:
        self.workdir = workdir
        self.trust_domain = trust_domain
        self.ca_dir = workdir / "ca"
        self.directory = workdir / "directory"
        self.policies = workdir / "policies"
        self.nodes: list[FerryNode] = []
        self._ca("init", "--ca-dir", str(self.ca_dir), "--trust-domain", trust_domain)

    @staticmethod
    def _ca(*args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "agent", "ca", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise FerryError(f"agent ca {' '.join(args)} failed: {result.stderr}")

    def add(
        self, node: SimNode, workers: int = 1, config: dict[str, Any] | None = None
    ) -> FerryNode:
        settings = dict(config or {})
        settings["mesh"] = {"directory": str(self.directory), **settings.get("mesh", {})}
        settings["identity"] = {"trust_domain": self.trust_domain, **settings.get("identity", {})}
        settings["policy"] = {"directory": str(self.policies), **settings.get("policy", {})}
        ferry = FerryNode(node, workers=workers, config=settings)
        ferry.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ca(
            "issue-node",
            node.name,
            "--ca-dir",
            str(self.ca_dir),
            "--out",
            str(ferry.state_dir / "identity"),
        )
        self.nodes.append(ferry)
        return ferry

    def wait_directory(self, entries: int, timeout: float = 10.0) -> None:
        """Until every worker of every node's proxy applied `entries` directory entries (IPs)."""
        deadline = time.monotonic() + timeout
        counts: list[list[int]] = []
        while time.monotonic() < deadline:
            proxies = [n.status()["proxy"] for n in self.nodes]
            counts = [[a["directory_entries"] for a in p.get("applied", [])] for p in proxies]
            if all(c and set(c) == {entries} for c in counts):
                return
            time.sleep(0.1)
        raise FerryError(f"directory did not converge to {entries} entries: {counts}")


def in_host_mounts(argv: list[str]) -> list[str]:
    """`argv` run in this process's mount namespace and root, from the node's netns: `ip netns
    exec` would give it a sysfs of its own, without the cgroup v2 hierarchy and the bpffs the eBPF
    backend needs.  The root is this process's too, so it also works in a chroot (`make
    fresh-check`), where the mount namespace's own root is outside it."""
    return ["nsenter", f"--target={os.getpid()}", "--mount", "--root", "--wd", "--", *argv]


class HostMountsFerry(FerryNode):
    """Ferry in the node's netns, in this process's mounts (`in_host_mounts`)."""

    def _argv(self, *args: str) -> list[str]:
        return in_host_mounts(super()._argv(*args))
