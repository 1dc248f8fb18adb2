"""A real `agent run` with `kubernetes.enabled`, against the stand-in API server.

The agent runs in a throwaway node namespace (as in test_enrollment_safety); the stand-in API
server (tests/kube_standin.py) listens on the node's loopback (its socket made inside the node's
namespace, served by this process), and the agent reaches it through a kubeconfig with a
bearer token.  Pods are `PodSandbox`es (tests/integration/kube_pods.py): a pinned netns, a
cgroup named after the pod's UID and a process, so the agent finds their namespaces the way it
does on a node for pods that ran before it (the process scan), and the same pods are objects of
the API server.  What an operator would see is checked: which pods get redirection rules in
their namespace, the annotations the agent writes, label flips, a watch that expired, the
Kubernetes view of `agent status`, and policy objects from the API server in force.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from agent.admin import request
from agent.netns import NetnsExecutor
from tests.integration.kube_pods import PodSandbox
from tests.integration.test_enrollment_safety import Node, ferry_rules
from tests.kube_standin import KubeStandin

TOKEN = secrets.token_hex(24)
NODE = "safety"  # what Node writes as node_name
MESH = "ferry.dev/mesh"
STATE = "ferry.dev/redirection"
REASON = "ferry.dev/redirection-reason"
T = TypeVar("T")


class KubeNode(Node):
    def __init__(self, workdir: Path) -> None:
        self.kubeconfig = workdir / "kubeconfig"
        self.sandboxes: dict[str, PodSandbox] = {}
        self.api: KubeStandin | None = None
        self.executor = NetnsExecutor()
        self.workdir = workdir
        self.proxy: subprocess.Popen[bytes] | None = None
        super().__init__(workdir)
        try:
            sock = self.executor.call(
                f"/var/run/netns/{self.netns}", lambda: socket.create_server(("127.0.0.1", 0))
            )
            self.api = KubeStandin(TOKEN, sock=sock, bookmark_interval=0.5)
            self.kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "node",
                "clusters": [{"name": "c", "cluster": {"server": self.api.url}}],
                "users": [{"name": "agent", "user": {"token": TOKEN}}],
                "contexts": [{"name": "node", "context": {"cluster": "c", "user": "agent"}}],
            }))  # fmt: skip
        except BaseException:
            self.teardown()
            raise

    def configure(self, **settings: Any) -> None:
        kube = {"enabled": True, "kubeconfig": str(self.kubeconfig), "scan_interval": 0.2}
        settings.setdefault("kubernetes", kube)
        super().configure(**settings)

    @property
    def server(self) -> KubeStandin:
        assert self.api is not None
        return self.api

    def namespace(self, name: str, **labels: str) -> None:
        self.server.apply("namespaces", {"metadata": {"name": name, "labels": labels}})

    def k8s_pod(self, name: str, namespace: str = "shop", labels: dict[str, str] | None = None,
                host_network: bool = False) -> PodSandbox:  # fmt: skip
        sandbox = PodSandbox(host_network=host_network)
        self.sandboxes[f"{namespace}/{name}"] = sandbox
        self.label(name, namespace, labels, host_network)
        return sandbox

    def label(self, name: str, namespace: str = "shop", labels: dict[str, str] | None = None,
              host_network: bool = False) -> None:  # fmt: skip
        """Create or replace the pod object (same UID), with these labels."""
        sandbox = self.sandboxes[f"{namespace}/{name}"]
        self.server.apply("pods", {
            "metadata": {"name": name, "namespace": namespace, "uid": sandbox.uid,
                         "labels": labels or {}},
            "spec": {"nodeName": NODE, "serviceAccountName": "web", "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running"},
        })  # fmt: skip

    def annotations(self, name: str, namespace: str = "shop") -> dict[str, str]:
        found = self.server.get("pods", namespace, name)
        assert found is not None
        return {k: v for k, v in (found["metadata"].get("annotations") or {}).items()
                if k.startswith("ferry.dev/")}  # fmt: skip

    def start_proxy(self) -> None:
        with open(self.workdir / "proxy.log", "ab") as log:
            self.proxy = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *self.argv("proxy", "--config",
                 str(self.config), "--workers", "1")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait(lambda: self.proxy_status().get("agent_connected", False), "the proxy")

    def proxy_status(self) -> dict[str, Any]:
        try:
            return request(self.state_dir / "proxy.sock", {"op": "status"}, timeout=5.0)
        except OSError:
            return {}

    def proxy_log(self) -> str:
        path = self.workdir / "proxy.log"
        return path.read_text() if path.exists() else ""

    def enforced(self) -> list[int]:
        """The policy version every proxy worker enforces."""
        return [a["policy_version"] for a in self.proxy_status().get("applied", [])]

    def policy_status(self) -> dict[str, Any]:
        reply = request(self.state_dir / "agent.sock", {"op": "status"})
        policy: dict[str, Any] = reply["policy"]
        return policy

    def wait_for(self, attempt: Callable[[], T], what: str, timeout: float = 10.0) -> T:
        """`attempt()`'s result once it stops raising OSError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return attempt()
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out waiting for {what}") from None
                time.sleep(0.05)

    def kube_status(self) -> dict[str, Any]:
        reply = request(self.state_dir / "agent.sock", {"op": "status"})
        assert reply["ok"], reply
        kube: dict[str, Any] = reply["kubernetes"]
        return kube

    def teardown(self) -> None:
        if self.proxy is not None:
            self.proxy.terminate()
            self.proxy.wait(10)
        try:
            super().teardown()
        finally:
            for sandbox in self.sandboxes.values():
                sandbox.remove()
            if self.api is not None:
                self.api.close()
            self.executor.shutdown()


@pytest.fixture
def node(privileged: None, tmp_path: Path) -> Iterator[KubeNode]:
    host_before = ferry_rules(None)
    made = KubeNode(tmp_path)
    try:
        yield made
    finally:
        made.teardown()
    assert ferry_rules(None) == host_before


def test_pods_are_enrolled_by_their_labels_and_annotated(node: KubeNode) -> None:
    node.namespace("shop", **{MESH: "enabled"})
    node.namespace("plain")
    web = node.k8s_pod("web", labels={"app": "web"})  # running before the agent: found by scan
    off = node.k8s_pod("off", labels={MESH: "disabled"})
    other = node.k8s_pod("other", "plain")
    node.k8s_pod("hostnet", host_network=True)
    node.start()
    node.wait(lambda: node.enrolled() == ["web"], "web enrolled")
    stored = json.loads(node.store())["workloads"][0]
    assert (stored["namespace"], stored["service_account"], stored["labels"]) == (
        "shop", "web", {"app": "web"})  # fmt: skip
    assert stored["netns"] == web.netns_path
    node.wait(lambda: ferry_rules(web.netns) != [], "web's rules")  # the record goes first
    assert ferry_rules(off.netns) == [] and ferry_rules(other.netns) == []
    node.wait(
        lambda: (
            node.annotations("web")
            == {STATE: "enabled", REASON: "namespace label ferry.dev/mesh=enabled"}
        ),
        "the annotation",
    )
    assert node.annotations("off") == {} and node.annotations("other", "plain") == {}

    started = time.monotonic()  # a new pod with the label: from the watch event to its rules
    api = node.k8s_pod("api", "plain", labels={MESH: "enabled"})
    node.wait(lambda: ferry_rules(api.netns) != [], "api's redirection")
    latency = time.monotonic() - started
    assert latency < 2.0, latency
    print(f"watch event to redirection in place: {latency * 1e3:.0f} ms")

    node.label("web", labels={"app": "web", MESH: "disabled"})  # opts out: rules removed
    node.wait(lambda: ferry_rules(web.netns) == [], "web unenrolled")
    node.wait(lambda: node.annotations("web") == {}, "web's annotations removed")
    assert node.enrolled() == ["api"]
    node.label("web", labels={"app": "web"})  # back in, through its namespace again
    node.wait(lambda: ferry_rules(web.netns) != [], "web enrolled again")

    status = node.cli("status", "--json")
    document = json.loads(status.stdout)
    kube = document["agent"]["kubernetes"]
    pods = {f"{p['namespace']}/{p['name']}": p for p in kube["pods"]}
    assert (pods["shop/web"]["enrolled"], pods["shop/web"]["state"]) == (True, "enabled")
    assert pods["shop/off"]["rule"] == "pod label ferry.dev/mesh=disabled"
    assert pods["shop/hostnet"]["rule"].startswith("host network")
    assert pods["plain/other"]["rule"].startswith("not selected")
    assert kube["watches"]["pods"]["synced"] and kube["watches"]["pods"]["errors"] == 0
    table = node.cli("status").stdout
    assert "Kubernetes  node safety" in table, table
    assert "shop/off" in table and "pod label ferry.dev/mesh=disabled" in table
    assert TOKEN not in node.log.read_text()


def test_a_watch_that_expired_relists_and_unenrolls_what_was_deleted(node: KubeNode) -> None:
    node.namespace("shop", **{MESH: "enabled"})
    web = node.k8s_pod("web")
    api = node.k8s_pod("api")
    node.start()
    node.wait(lambda: node.enrolled() == ["api", "web"], "both enrolled")
    node.wait(lambda: node.kube_status()["watches"]["pods"]["events"] >= 2, "annotation events")
    node.server.expire(lambda: node.server.delete("pods", "shop", "web"))  # unseen by any watch
    node.wait(lambda: node.enrolled() == ["api"], "web unenrolled after the relist")
    # the record goes first, then the rules (enrollment.py: persist, redirection, proxies)
    node.wait(lambda: ferry_rules(web.netns) == [], "web's rules removed")
    assert ferry_rules(api.netns) != []
    watches = node.kube_status()["watches"]["pods"]
    assert watches["relists"] == 1, watches
    assert "listing again" in node.log.read_text()


ECHO = """
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", 7007))
def echo(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
"""
WEB_IP, CLIENT_IP = "10.79.3.2", "10.79.3.1"
DENY_BLOCKED = {
    "metadata": {"name": "deny-blocked", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"tier": "blocked"}}, "action": "DENY", "rules": [{}]},
}
TYPO = {
    "metadata": {"name": "typo", "namespace": "shop"},
    "spec": {"rules": [{"from": [{"source": {"notPrinciple": ["x"]}}]}]},
}


class Wired:
    """A client netns joined to a pod's netns by a veth, an echo server in the pod."""

    def __init__(self, node: KubeNode, pod: PodSandbox, client: PodSandbox) -> None:
        self.node, self.client = node, client
        link = f"fk{secrets.token_hex(3)}"
        for argv in (
            ["ip", "link", "add", link, "netns", pod.netns, "type", "veth", "peer", "name",
             link + "p", "netns", client.netns],
            ["ip", "-n", pod.netns, "addr", "add", f"{WEB_IP}/30", "dev", link],
            ["ip", "-n", client.netns, "addr", "add", f"{CLIENT_IP}/30", "dev", link + "p"],
            ["ip", "-n", pod.netns, "link", "set", link, "up"],
            ["ip", "-n", client.netns, "link", "set", link + "p", "up"],
        ):  # fmt: skip
            subprocess.run(argv, check=True)
        self.server = subprocess.Popen(["ip", "netns", "exec", pod.netns, sys.executable, "-c",
                                        ECHO])  # fmt: skip

    def connect(self) -> socket.socket:
        def dial() -> socket.socket:
            return socket.create_connection((WEB_IP, 7007), timeout=5)

        return self.node.executor.call(self.client.netns_path, dial)

    def close(self) -> None:
        self.server.kill()
        self.server.wait(10)


def echoes(conn: socket.socket) -> bool:
    try:
        conn.sendall(b"ping")
        return conn.recv(16) == b"ping"
    except OSError:
        return False


def test_policy_objects_are_enforced_and_labels_change_in_place(node: KubeNode) -> None:
    node.namespace("shop", **{MESH: "enabled"})
    node.namespace("plain")
    web = node.k8s_pod("web", labels={"app": "web"})
    client = node.k8s_pod("client", "plain")
    wired = Wired(node, web, client)
    try:
        node.server.apply("authorizationpolicies", DENY_BLOCKED)
        node.start()
        node.start_proxy()
        node.wait(lambda: node.enrolled() == ["web"], "web enrolled")
        node.wait(lambda: node.enforced() == [1], "policy version 1 in the proxy worker")
        conn = node.wait_for(wired.connect, "the echo server through the proxy")
        assert echoes(conn)
        check = ("policy", "check", "web", "--from-ip", CLIENT_IP, "--port", "7007")
        assert node.cli(*check).returncode == 0

        node.label("web", labels={"app": "web", "version": "v2"})  # in place: the conn stays
        node.wait(lambda: json.loads(node.store())["workloads"][0]["labels"].get("version")
                  == "v2", "the new labels")  # fmt: skip
        assert echoes(conn), "a relabelled workload must keep its connections"
        assert "stopped serving" not in node.proxy_log()

        node.label("web", labels={"app": "web", "tier": "blocked"})  # now the DENY selects it
        node.wait(lambda: not echoes(conn), "the connection closed by the DENY", timeout=5)
        denied = node.cli(*check)
        assert denied.returncode == 1 and "AuthorizationPolicy shop/deny-blocked" in denied.stdout

        node.server.apply("authorizationpolicies", TYPO)  # rejected, naming the object's field
        node.wait(lambda: node.policy_status()["rejected"] is not None, "the rejection")
        [error] = node.policy_status()["rejected"]["errors"]
        assert error.startswith("kubernetes: AuthorizationPolicy shop/typo: spec.rules[0].from[0]"
                                ".source"), error  # fmt: skip
        assert node.policy_status()["version"] == 1
        node.server.delete("authorizationpolicies", "shop", "typo")
        node.server.delete("authorizationpolicies", "shop", "deny-blocked")
        node.wait(lambda: node.enforced() == [2], "policy version 2 (no policy) enforced")
        assert node.cli(*check).returncode == 0
        conn.close()
    finally:
        wired.close()


PLUGIN = Path(__file__).resolve().parents[2] / "build" / "ferry-cni"


def pod_object(name: str, uid: str, labels: dict[str, str], **meta: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": labels, **meta},
        "spec": {"nodeName": NODE, "serviceAccountName": "web",
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Pending"},
    }  # fmt: skip


def plugin(node: KubeNode, command: str, netns: str, name: str,
           uid: str) -> subprocess.Popen[str]:  # fmt: skip
    """`ferry-cni` as the runtime runs it for a pod sandbox (answer with `.communicate()`)."""
    body = {
        "cniVersion": "1.0.0",
        "name": "pods",
        "type": "ferry-cni",
        "state_dir": str(node.state_dir),
        "prevResult": {"cniVersion": "1.0.0", "ips": []},
    }
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": f"sandbox-{name}",
           "CNI_NETNS": f"/var/run/netns/{netns}", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};"
                       f"K8S_POD_UID={uid}"}  # fmt: skip
    with tempfile.TemporaryFile("w+") as config:
        config.write(json.dumps(body))
        config.seek(0)
        return subprocess.Popen([str(PLUGIN)], stdin=config, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip


def test_the_cni_plugin_is_answered_by_the_kubernetes_rules(node: KubeNode) -> None:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: run `make setup` (it builds the plugin)", pytrace=False)
    node.namespace("shop", **{MESH: "enabled"})
    node.start()
    node.wait(lambda: node.kube_status()["watches"]["namespaces"]["synced"], "the watches")

    web, web_uid = node.pod("cni-web"), secrets.token_hex(16)  # no process: only the CNI call
    adding = plugin(node, "ADD", web, "cni-web", web_uid)  # tells where its namespace is
    time.sleep(0.3)  # the ADD came before the pod watch saw the pod: the agent waits for it
    node.server.apply("pods", pod_object("cni-web", web_uid, {"app": "web"}))
    out, err = adding.communicate(timeout=30)
    assert adding.returncode == 0, out + err
    assert "cni-web" in node.enrolled() and ferry_rules(web) != []  # before the ADD returned
    node.wait(lambda: node.annotations("cni-web").get(STATE) == "enabled", "the annotation")

    off, off_uid = node.pod("cni-off"), secrets.token_hex(16)
    node.server.apply("pods", pod_object("cni-off", off_uid, {MESH: "disabled"}))
    adding = plugin(node, "ADD", off, "cni-off", off_uid)
    out, err = adding.communicate(timeout=30)
    assert adding.returncode == 0, out + err  # starts, not enrolled
    assert "cni-off" not in node.enrolled() and ferry_rules(off) == []

    deleting = {"deletionTimestamp": "2026-11-30T16:00:00Z"}
    node.server.apply("pods", pod_object("cni-web", web_uid, {"app": "web"}, **deleting))
    removing = plugin(node, "DEL", web, "cni-web", web_uid)
    assert removing.wait(30) == 0
    assert "cni-web" not in node.enrolled()
    time.sleep(0.5)  # reconciles meanwhile must not enroll a pod whose sandbox is going away
    assert "cni-web" not in node.enrolled() and ferry_rules(web) == []
