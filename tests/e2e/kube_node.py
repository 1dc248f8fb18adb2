"""A simulated Kubernetes node for end-to-end tests: stand-in API server, CA service, agent.

`kube_authority` starts the stand-in API server (tests/kube_standin.py, with TokenReview) on the
node's loopback and a real `agent ca serve` process in the node's namespace, reading the root CA
from a folder that stands for the mounted Secret (`wait_ready` waits for it to answer); it makes
the node agent's projected token.
`kube_cluster` adds a real agent and proxy in Kubernetes mode (strict by default) whose
credentials folder holds only `bundle.pem`: certificates come from the CA service by CSR.  Pods
are wired by the `bridge` plugin and announced with `cni_add`, the real `ferry-cni` binary run as
a runtime runs it.  Both are context managers that clean up everything they started.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.identity.ca import BUNDLE, init_ca
from agent.netns import NetnsExecutor
from agent.redirect import ebpf
from sim.ferry import FerryNode, HostMountsFerry
from sim.node import NETNS_DIR, Pod, SimNode
from tests.kube_standin import KubeStandin

PLUGIN = Path(__file__).resolve().parents[2] / "build" / "ferry-cni"
API_TOKEN = "standin-admin-token"
AGENT_ACCOUNT = "system:serviceaccount:ferry-system:ferry-agent"
MESH = "ferry.dev/mesh"


@dataclass
class Authority:
    """The stand-in API server and a running `agent ca serve`, both in the node's namespace."""

    node: SimNode
    api: KubeStandin
    kubeconfig: Path
    ca_dir: Path
    ca_url: str
    agent_token: str
    executor: NetnsExecutor
    workdir: Path
    process: subprocess.Popen[bytes]

    def wait_ready(self) -> None:
        """Until the CA service answers /healthz (it starts while the agent does)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            probe = self.node.exec(["curl", "-sS", "--cacert", str(self.ca_dir / BUNDLE),
                                    f"{self.ca_url}/healthz"], check=False)  # fmt: skip
            if probe.returncode == 0:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("the CA service did not come up")


@dataclass
class Cluster:
    ca: Authority
    ferry: FerryNode
    client: Pod
    server: Pod
    backend: str


def free_port(executor: NetnsExecutor, netns: str) -> int:
    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    return executor.call(netns, pick)


def pod_object(name: str, uid: str, node: str, sa: str) -> dict[str, object]:
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running"},
    }  # fmt: skip


def cni_add(ferry: FerryNode, pod: Pod, uid: str) -> subprocess.CompletedProcess[str]:
    """What the runtime does after the bridge plugin: ferry-cni ADD with kubelet's CNI_ARGS."""
    body = {"cniVersion": "1.0.0", "name": "pods", "type": "ferry-cni",
            "state_dir": str(ferry.state_dir),
            "prevResult": {"cniVersion": "1.0.0", "ips": [
                {"address": f"{pod.ip4}/24"}, {"address": f"{pod.ip6}/64"}]}}  # fmt: skip
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": f"sandbox-{pod.name}",
        "CNI_NETNS": str(NETNS_DIR / pod.netns),
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod.name};"
        f"K8S_POD_UID={uid}",
        "CNI_PATH": "/usr/lib/cni",
    }
    return subprocess.run([str(PLUGIN)], input=json.dumps(body), env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


@contextlib.contextmanager
def kube_authority(sim_node: SimNode, tmp_path: Path) -> Iterator[Authority]:
    executor = NetnsExecutor()
    netns = sim_node.netns_path
    api = KubeStandin(API_TOKEN, sock=executor.call(
        netns, lambda: socket.create_server(("127.0.0.1", 0))), bookmark_interval=0.5)  # fmt: skip
    ca: subprocess.Popen[bytes] | None = None
    try:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {"token": API_TOKEN}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        }))  # fmt: skip
        ca_dir = tmp_path / "secret"  # the mounted Secret: ca.key, ca.crt, bundle.pem
        init_ca(ca_dir, "cluster.local")
        port = free_port(executor, netns)
        ca_url = f"https://127.0.0.1:{port}"
        ca_log = open(tmp_path / "ca.log", "ab")  # noqa: SIM115 - closed with the process
        ca = sim_node.popen(
            [sys.executable, "-m", "agent", "ca", "serve", "--ca-dir", str(ca_dir),
             "--listen", f"127.0.0.1:{port}", "--kubeconfig", str(kubeconfig),
             "--max-ttl", "3600"],
            stdin=subprocess.DEVNULL, stdout=ca_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        ca_log.close()
        agent_token = api.service_account_token("ferry-system", "ferry-agent", "ferry-agent-x",
                                                sim_node.name)  # fmt: skip
        yield Authority(sim_node, api, kubeconfig, ca_dir, ca_url, agent_token, executor, tmp_path,
                        ca)  # fmt: skip
    except BaseException:
        print((tmp_path / "ca.log").read_text() if (tmp_path / "ca.log").exists() else "")
        raise
    finally:
        if ca is not None:
            ca.terminate()
            ca.wait(10)
        api.close()
        executor.shutdown()


@contextlib.contextmanager
def kube_cluster(authority: Authority, backend: str = "iptables") -> Iterator[Cluster]:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: run `make setup` (it builds the plugin)", pytrace=False)
    a = authority
    credentials = a.workdir / "credentials"  # what the node has: the public bundle only
    credentials.mkdir(mode=0o700)
    (credentials / BUNDLE).write_bytes((a.ca_dir / BUNDLE).read_bytes())
    token_file = a.workdir / "token"
    token_file.write_text(a.agent_token)
    token_file.chmod(0o600)
    a.api.apply("namespaces", {"metadata": {"name": "shop", "labels": {MESH: "enabled"}}})
    client, server = a.node.add_pod("client"), a.node.add_pod("server")
    server.start_http_server(8080)
    node_class = HostMountsFerry if backend == "ebpf" else FerryNode
    ferry = node_class(a.node, config={
        "agent": {"reconcile_interval": 3600},
        "redirection": {"backend": backend},
        "identity": {"node_credentials": str(credentials), "ca_url": a.ca_url,
                     "token_file": str(token_file), "workload_cert_ttl": 600},
        "kubernetes": {"enabled": True, "kubeconfig": str(a.kubeconfig),
                       "policies": False, "scan_interval": 0.2},
        "mesh": {"default_mode": "strict"},
    })  # fmt: skip
    try:
        ferry.start()
        a.wait_ready()
        yield Cluster(a, ferry, client, server, backend)
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.proxy)
        ferry.stop(ferry.agent)
        ebpf.cleanup(ferry.state_dir)  # pins and the bpffs mount, when the backend was eBPF
