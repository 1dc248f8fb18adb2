"""The `ferry-cni` binary run as a runtime runs it, against a real agent on a simulated node.

Each call is the plugin executable with the CNI environment and a network config on stdin
(prevResult from a real `bridge` ADD: the pod namespaces come from `SimNode.add_pod`), so this
covers what the containerd tests cannot reach: VERSION, CHECK (containerd 1.6 never calls it)
before and after the pod's redirection drifts, an ADD and a DEL repeated, the refusals the
agent and the plugin answer with CNI error codes, and the plugin's own answers while no agent
runs (fail closed, except for excluded namespaces; DEL always succeeds).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.ferry import FerryNode
from sim.node import NETNS_DIR, Pod, SimNode

PLUGIN = Path(__file__).resolve().parents[2] / "build" / "ferry-cni"


@pytest.fixture
def ferry(sim_node: SimNode) -> Iterator[FerryNode]:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: run `make setup` (it builds the plugin)", pytrace=False)
    agent = {"reconcile_interval": 3600, "loss_watch_interval": 0}  # drift stays for CHECK
    node = FerryNode(sim_node, workers=1, config={"agent": agent})
    node.start_agent()
    try:
        yield node
    except BaseException:
        print(node.log_text())
        raise


def cni(
    command: str, ferry: FerryNode, pod: Pod | None, namespace: str = "shop", **config: Any
) -> tuple[int, dict[str, Any] | None, str]:
    """Run the plugin; (exit code, the JSON it printed or None, stderr)."""
    prev = {"cniVersion": "1.0.0", "ips": [{"address": f"{pod.ip4}/24"}]} if pod else None
    body = {"cniVersion": "1.0.0", "name": "pods", "type": "ferry-cni",
            "state_dir": str(ferry.state_dir), "prevResult": prev, **config}  # fmt: skip
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": f"sandbox-{pod.name if pod else 'none'}",
        "CNI_NETNS": str(NETNS_DIR / pod.netns) if pod else "",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web",
        "CNI_PATH": "/usr/lib/cni",
    }
    result = subprocess.run(
        [str(PLUGIN)], input=json.dumps(body), env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    printed = json.loads(result.stdout) if result.stdout.strip() else None
    return result.returncode, printed, result.stderr


def enrolled(ferry: FerryNode) -> list[str]:
    return [str(w["name"]) for w in ferry.status()["workloads"]]


def test_version_needs_no_agent_and_no_config() -> None:
    result = subprocess.run(
        [str(PLUGIN)], env={"CNI_COMMAND": "VERSION"}, input="", capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert json.loads(result.stdout)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]


def test_add_check_del_with_a_real_agent(ferry: FerryNode, sim_node: SimNode) -> None:
    pod = sim_node.add_pod("web")
    code, printed, _ = cni("ADD", ferry, pod)
    assert code == 0 and printed == {"cniVersion": "1.0.0", "ips": [{"address": f"{pod.ip4}/24"}]}
    assert enrolled(ferry) == ["web"]
    assert cni("ADD", ferry, pod)[0] == 0  # a repeated ADD changes nothing
    assert enrolled(ferry) == ["web"]
    assert cni("CHECK", ferry, pod) == (0, None, "")

    pod.exec(["iptables-legacy", "-t", "nat", "-F", "FERRY_OUTPUT"], check=True)  # drift
    code, printed, _ = cni("CHECK", ferry, pod)
    assert code == 1 and printed is not None
    assert printed["code"] == 101 and "redirection is drifted" in printed["msg"]

    assert cni("DEL", ferry, pod)[0] == 0
    assert enrolled(ferry) == []
    assert "FERRY" not in pod.exec(["iptables-legacy-save"], check=True).stdout
    assert cni("DEL", ferry, pod)[0] == 0  # idempotent
    code, printed, _ = cni("CHECK", ferry, pod)
    assert code == 1 and printed is not None and printed["code"] == 101
    assert "must be enrolled in Ferry and is not" in printed["msg"]


def test_refusals_are_cni_errors(ferry: FerryNode, sim_node: SimNode) -> None:
    pod = sim_node.add_pod("web")
    code, printed, _ = cni("ADD", ferry, pod, cniVersion="0.2.0")
    assert code == 1 and printed is not None and printed["code"] == 1
    assert "'0.2.0'" in printed["details"]
    code, printed, _ = cni("ADD", ferry, pod, namespace="Not_A_Label")
    assert code == 1 and printed is not None and printed["code"] == 100
    assert "'Not_A_Label'" in printed["details"]
    assert enrolled(ferry) == []
    result = subprocess.run(
        [str(PLUGIN)], env={"CNI_COMMAND": "ADD"}, input="{not json", capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1 and json.loads(result.stdout)["code"] == 6


def test_the_plugin_fails_closed_without_an_agent(ferry: FerryNode, sim_node: SimNode) -> None:
    pod = sim_node.add_pod("web")
    ferry.stop(ferry.agent)
    code, printed, stderr = cni("ADD", ferry, pod)
    assert code == 1 and printed is not None and printed["code"] == 11
    assert "the Ferry agent is not running" in printed["details"] and "'shop'" in stderr
    assert cni("CHECK", ferry, pod)[0] == 1
    code, printed, _ = cni("ADD", ferry, pod, namespace="kube-system")
    assert code == 0 and printed == {"cniVersion": "1.0.0", "ips": [{"address": f"{pod.ip4}/24"}]}
    code, printed, _ = cni("ADD", ferry, pod, namespace="infra", exclude_namespaces=["infra"])
    assert code == 0 and printed is not None
    assert cni("ADD", ferry, pod, namespace="kube-system", exclude_namespaces=[])[0] == 1
    assert cni("DEL", ferry, pod)[0] == 0
