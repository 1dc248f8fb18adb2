"""Node-scoped identity: `agent ca serve`, the stand-in API server and a real node agent.

One simulated node in Kubernetes mode whose agent holds no signing key (its credentials folder
has only `bundle.pem`): the root CA lives in a folder standing for the Secret, read only by a
real `agent ca serve` process in the node's namespace.  Pods are wired by the `bridge` plugin and
announced by the real `ferry-cni` binary (as a runtime runs it), the API server is the stand-in
(tests/kube_standin.py, with TokenReview).  Checked: both pods get certificates signed by the
root through CSRs, their traffic is mutual TLS with those identities, and the CA refuses what a
node must not get: a pod on another node (403 and why), an expired or a forged token (401).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from agent.admin import request
from agent.identity.ca import BUNDLE, init_ca
from agent.identity.ca_client import CaClient
from agent.identity.spiffe import IdentityError
from agent.netns import NetnsExecutor
from sim.ferry import FerryNode
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


@dataclass
class Cluster:
    ca: Authority
    ferry: FerryNode
    client: Pod
    server: Pod


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
            "prevResult": {"cniVersion": "1.0.0",
                           "ips": [{"address": f"{pod.ip4}/24"}]}}  # fmt: skip
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


def wait_healthy(node: SimNode, url: str, bundle: Path, ca: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = node.exec(["curl", "-sS", "--cacert", str(bundle), f"{url}/healthz"], check=False)
        if probe.returncode == 0:
            return
        if ca.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError("the CA service did not come up")


@pytest.fixture
def authority(sim_node: SimNode, tmp_path: Path) -> Iterator[Authority]:
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
        wait_healthy(sim_node, ca_url, ca_dir / BUNDLE, ca)
        agent_token = api.service_account_token("ferry-system", "ferry-agent", "ferry-agent-x",
                                                sim_node.name)  # fmt: skip
        yield Authority(sim_node, api, kubeconfig, ca_dir, ca_url, agent_token, executor, tmp_path)
    except BaseException:
        print((tmp_path / "ca.log").read_text() if (tmp_path / "ca.log").exists() else "")
        raise
    finally:
        if ca is not None:
            ca.terminate()
            ca.wait(10)
        api.close()
        executor.shutdown()


@pytest.fixture
def cluster(authority: Authority) -> Iterator[Cluster]:
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
    ferry = FerryNode(a.node, config={
        "agent": {"reconcile_interval": 3600},
        "identity": {"node_credentials": str(credentials), "ca_url": a.ca_url,
                     "token_file": str(token_file), "workload_cert_ttl": 600},
        "kubernetes": {"enabled": True, "kubeconfig": str(a.kubeconfig),
                       "policies": False, "scan_interval": 0.2},
        "mesh": {"default_mode": "strict"},
    })  # fmt: skip
    try:
        ferry.start()
        yield Cluster(a, ferry, client, server)
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.proxy)
        ferry.stop(ferry.agent)


def test_workload_certificates_come_from_the_ca_service_and_carry_mtls(cluster: Cluster) -> None:
    c, a = cluster, cluster.ca
    for pod, sa in ((c.client, "client"), (c.server, "server")):
        uid = str(uuid.uuid4())
        a.api.apply("pods", pod_object(pod.name, uid, a.node.name, sa))
        added = cni_add(c.ferry, pod, uid)
        assert added.returncode == 0, added.stdout + added.stderr
    reply = c.client.fetch_json(f"http://{c.server.ip4}:8080/")
    assert reply["peer"] == c.client.ip4
    proxy = request(c.ferry.state_dir / "proxy.sock", {"op": "status"})
    flows = [f for w in proxy["workloads"].values() for f in w["flows"]]
    inbound = {(f["security"], f["peer_identity"]) for f in flows if f["direction"] == "inbound"}
    assert inbound == {("mtls", "spiffe://cluster.local/ns/shop/sa/client")}, flows

    issued = c.ferry.state_dir / "identity"
    assert not issued.exists() or not any(issued.glob("*.key"))  # no signing key on the node
    assert [p.name for p in (a.workdir / "credentials").iterdir()] == [BUNDLE]
    served = [w["certificate"] for w in c.ferry.status()["workloads"]]
    assert len(served) == 2  # the agent's TTL, as signed by the CA
    assert all(time.time() + 500 < cert["not_after"] <= time.time() + 605 for cert in served)
    log = (c.ferry.logs / "run.log").read_text()
    assert "issued certificate for" in log and "spiffe://cluster.local/ns/shop/sa/server" in log
    assert a.agent_token not in log
    ca_log = (a.workdir / "ca.log").read_text()
    assert f"signed spiffe://cluster.local/ns/shop/sa/server for {AGENT_ACCOUNT}" in ca_log
    assert a.agent_token not in ca_log


def ask(c: Authority, token: str, pod: str, sa: str = "server") -> str:
    """Ask the CA as the node agent would, with `token`, for `sa` on pod `shop/<pod>`."""
    token_file = c.workdir / f"token-{uuid.uuid4().hex[:6]}"
    token_file.write_text(token)
    client = CaClient(c.ca_url, c.ca_dir / BUNDLE, token_file, "cluster.local",
                      lambda _ns, _sa: ("shop", pod))  # fmt: skip
    try:
        minted = c.executor.call(c.node.netns_path, lambda: client.mint("shop", sa, 600))
    except IdentityError as exc:
        return str(exc)
    leaf = x509.load_pem_x509_certificates(minted.chain_pem)[0]
    assert leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC) + dt.timedelta(seconds=601)
    return "signed"


def test_the_ca_refuses_pods_of_other_nodes_and_bad_tokens(authority: Authority) -> None:
    c = authority
    c.api.apply("pods", pod_object("here", str(uuid.uuid4()), c.node.name, "server"))
    c.api.apply("pods", pod_object("faraway", str(uuid.uuid4()), "node-b", "server"))
    assert ask(c, c.agent_token, "here") == "signed"
    refused = ask(c, c.agent_token, "faraway")
    assert "403" in refused and (
        f"pod shop/faraway is scheduled on node 'node-b', not on the requesting node "
        f"'{c.node.name}'" in refused
    ), refused
    assert "403" in ask(c, c.agent_token, "here", sa="admin")  # not the pod's service account
    assert "pod shop/gone not found" in ask(c, c.agent_token, "gone")
    expired = c.api.service_account_token("ferry-system", "ferry-agent", "ferry-agent-x",
                                          c.node.name, expires_in=-1)  # fmt: skip
    assert "401" in ask(c, expired, "here") and "expired" in ask(c, expired, "here")
    assert "401" in ask(c, "forged.jwt.token", "here")
    workload = c.api.service_account_token("shop", "server", "here", c.node.name)
    assert "is not a Ferry node agent" in ask(c, workload, "here")  # a pod's own token
