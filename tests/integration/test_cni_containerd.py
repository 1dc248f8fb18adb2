"""ferry-cni under a real container runtime: containerd + runc, driven over CRI as kubelet does.

One module-scoped node (`sim.node.SimNode`) runs Ferry's agent and proxy and a private
containerd (`sim.containerd.Containerd`: its own root, state, sockets and image).  Its CNI conf
dir starts as a plain `bridge` + `host-local` network (the node's bridge and pod subnet), and
`agent cni install` chains `ferry-cni` into it, exactly as on a node.  A server pod (a network
namespace wired by the same bridge, outside containerd) runs the echo server.

Every pod is created with the CRI calls kubelet makes: RunPodSandbox (containerd runs the CNI
chain with K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID), then CreateContainer and
StartContainer for the app, and StopPodSandbox / RemovePodSandbox to delete it.  What a user
would notice: the sandbox's pod is enrolled before any app container exists, the app's very
first connection goes through the proxy (and the server sees the pod's own address), a pod of a
mesh namespace does not start while the agent is down (while a kube-system pod does), and
deleting the pod unenrolls it and leaves nothing behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc  # type: ignore[import-untyped]
import pytest

from sim.containerd import Containerd
from sim.ferry import FerryNode
from sim.node import CNI_PATH, Pod, SimNode
from tests.run_id import SIM_PREFIX

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "build" / "ferry-cni"


@dataclass
class Cluster:
    node: SimNode
    ferry: FerryNode
    containerd: Containerd
    server: Pod
    conf_dir: Path


def workloads(ferry: FerryNode) -> dict[str, dict[str, object]]:
    return {str(w["name"]): w for w in ferry.status()["workloads"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: run `make setup` (it builds the plugin)", pytrace=False)
    work = tmp_path_factory.mktemp("cni")
    conf_dir, bin_dir = work / "net.d", work / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        (bin_dir / plugin).symlink_to(CNI_PATH / plugin)
    with SimNode(SIM_PREFIX) as node:
        ferry = FerryNode(node, workers=1, config={"agent": {"reconcile_interval": 3600}})
        containerd = Containerd(node, bin_dir, conf_dir)
        try:
            (conf_dir / "10-pods.conf").write_text(json.dumps(node.cni_config()))
            installed = subprocess.run(
                [sys.executable, "-m", "agent", "cni", "install", "--cni-conf-dir", str(conf_dir),
                 "--cni-bin-dir", str(bin_dir), "--plugin", str(PLUGIN),
                 "--state-dir", str(ferry.state_dir), "--timeout", "20"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert installed.returncode == 0, installed.stderr
            server = node.add_pod("server")
            server.start_http_server(8080)
            ferry.start()
            containerd.start()
            yield Cluster(node, ferry, containerd, server, conf_dir)
        except BaseException:
            print(ferry.log_text(), containerd.log_tail(), sep="\n")
            raise
        finally:
            containerd.stop()


def test_the_conflist_is_bridge_then_ferry_cni(cluster: Cluster) -> None:
    document = json.loads((cluster.conf_dir / "10-pods.conflist").read_text())
    assert [p["type"] for p in document["plugins"]] == ["bridge", "ferry-cni"]
    assert not (cluster.conf_dir / "10-pods.conf").exists()


def test_a_pod_is_enrolled_before_its_app_starts_and_its_first_connection_is_intercepted(
    cluster: Cluster,
) -> None:
    sandbox = cluster.containerd.run_pod("web", "shop")
    ip, netns = cluster.containerd.pod_status(sandbox)
    enrolled = workloads(cluster.ferry)["web"]  # no app container exists yet
    assert enrolled["namespace"] == "shop" and enrolled["netns"] == netns
    assert enrolled["redirection"] == "ok"
    assert enrolled["identity"] == "spiffe://cluster.local/ns/shop/sa/default"

    app = cluster.containerd.start_container(
        sandbox, "app", ["wget", "-q", "-O", "-", f"http://{cluster.server.ip4}:8080/first"]
    )
    code, output = cluster.containerd.wait_exited(sandbox, app)

    assert code == 0, output
    assert json.loads(output)["peer"] == ip  # the server sees the pod's own address
    traffic = workloads(cluster.ferry)["web"]["traffic"]
    assert isinstance(traffic, dict)
    assert traffic["outbound"]["connections_opened"] == 1  # the app's first connection
    cluster.containerd.remove_pod(sandbox)


def test_deleting_the_pod_unenrolls_it_and_leaves_nothing(cluster: Cluster) -> None:
    sandbox = cluster.containerd.run_pod("cart", "shop")
    _ip, netns = cluster.containerd.pod_status(sandbox)
    assert "cart" in workloads(cluster.ferry)

    cluster.containerd.remove_pod(sandbox)

    assert "cart" not in workloads(cluster.ferry)
    assert not Path(netns).exists()
    sandboxes = json.loads((cluster.ferry.state_dir / "cni-sandboxes.json").read_text())
    assert sandboxes["sandboxes"] == {}
    proxy = cluster.ferry.status()["proxy"]
    assert proxy.get("workloads", 0) in (0, [], {}), proxy


def test_the_plugin_fails_closed_while_the_agent_is_down(cluster: Cluster) -> None:
    ferry = cluster.ferry
    ferry.stop(ferry.agent)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            cluster.containerd.run_pod("pay", "shop")
        assert "the Ferry agent is not running" in str(refused.value)
        assert "shop" in str(refused.value)
        system = cluster.containerd.run_pod("coredns", "kube-system")  # never blocked
        ip, _netns = cluster.containerd.pod_status(system)
        assert ip
        cluster.containerd.remove_pod(system)
    finally:
        ferry.start_agent()
        ferry.wait_connected()
    assert "pay" not in workloads(ferry)
    sandbox = cluster.containerd.run_pod("pay", "shop")  # kubelet's retry, agent back
    assert workloads(ferry)["pay"]["redirection"] == "ok"
    cluster.containerd.remove_pod(sandbox)


def test_pods_of_excluded_namespaces_are_never_enrolled(cluster: Cluster) -> None:
    sandbox = cluster.containerd.run_pod("metrics", "kube-system")
    assert "metrics" not in workloads(cluster.ferry)
    app = cluster.containerd.start_container(
        sandbox, "app", ["wget", "-q", "-O", "-", f"http://{cluster.server.ip4}:8080/direct"]
    )
    code, output = cluster.containerd.wait_exited(sandbox, app)
    assert code == 0, output
    cluster.containerd.remove_pod(sandbox)
