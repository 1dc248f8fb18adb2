"""Kubelet health probes reach strict pods; nothing else gets in without mTLS.

One simulated node in Kubernetes mode (tests/e2e/kube_node.py), every pod strict.  The node's
own network namespace plays kubelet: its HTTP probe (curl) to the enrolled pod is answered, and
the app sees it come from the probe source 169.254.7.127 (fd16:9254:7127:1337:ffff:ffff:ffff:ffff
over IPv6), the SNAT of `agent.redirect.probes`; a pod that is not in the mesh connecting in
plaintext is refused, and its request never reaches the app.  With each of the three redirection
backends in the pods; the node's SNAT chain is removed without residue (as `agent cleanup` does).
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.redirect import ebpf
from agent.redirect.ebpf_object import load_or_compile
from agent.redirect.probes import remove_host_rules
from sim.node import SimNode
from tests.e2e.kube_node import Cluster, cni_add, kube_authority, kube_cluster, pod_object


@pytest.fixture(params=["iptables", "nftables", "ebpf"])
def cluster(sim_node: SimNode, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The same node with each redirection backend in the pods (the node's SNAT is one)."""
    if request.param == "ebpf":
        load_or_compile(Path(os.environ[ebpf.CACHE_ENV]))  # compiled once per session, cached
    with (
        kube_authority(sim_node, tmp_path) as authority,
        kube_cluster(authority, request.param) as made,
    ):
        yield made


def test_kubelet_probes_reach_a_strict_pod_and_plaintext_from_pods_does_not(
    cluster: Cluster,
) -> None:
    c, node = cluster, cluster.ca.node
    uid = str(uuid.uuid4())
    c.ca.api.apply("pods", pod_object(c.server.name, uid, node.name, "server"))
    added = cni_add(c.ferry, c.server, uid)
    assert added.returncode == 0, added.stdout + added.stderr
    outsider = node.add_pod("outsider")  # no pod object: not in the mesh, plaintext only

    for url, source in (
        (f"http://{c.server.ip4}:8080/healthz", "169.254.7.127"),
        (f"http://[{c.server.ip6}]:8080/healthz", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
    ):
        probe = node.exec(["curl", "-sS", "--max-time", "5", url], check=False)
        assert probe.returncode == 0, probe.stderr
        assert f'"peer": "{source}"' in probe.stdout.replace('":"', '": "'), probe.stdout

    path = f"/plain-{secrets.token_hex(4)}"
    refused = outsider.curl(f"http://{c.server.ip4}:8080{path}", timeout=5)
    assert refused.returncode != 0, refused.stdout
    assert not [seen for seen in c.server.seen("http", 8080) if seen["path"] == path]

    assert c.ferry.status()["backend"] == c.backend
    saved = node.exec(["iptables-legacy-save", "-t", "nat"], check=True).stdout
    assert (
        f"-A FERRY_POSTROUTING -d {c.server.ip4}/32 -p tcp -m owner --socket-exists "
        "-j SNAT --to-source 169.254.7.127"
    ) in saved

    c.ferry.stop(c.ferry.agent)  # what `agent cleanup` does on the node (not run here: it
    c.ca.executor.call(node.netns_path, remove_host_rules)  # cleans every netns of the host)
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        assert "FERRY" not in node.exec([tool, "-t", "nat"], check=True).stdout
