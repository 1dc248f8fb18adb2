"""Node-scoped identity: `agent ca serve`, the stand-in API server and a real node agent.

One simulated node in Kubernetes mode (tests/e2e/kube_node.py) whose agent holds no signing key:
the root CA lives only in the folder standing for the Secret, read by a real `agent ca serve`.
Checked: both pods get certificates signed by the root through CSRs, their traffic is mutual TLS
with those identities, and the CA refuses what a node must not get: a pod on another node (403
and why), another service account, a pod that does not exist, an expired or a forged token
(401), a workload's own token.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from agent.admin import request
from agent.identity.ca import BUNDLE
from agent.identity.ca_client import CaClient
from agent.identity.spiffe import IdentityError
from sim.node import SimNode
from tests.e2e.kube_node import (
    AGENT_ACCOUNT,
    Authority,
    Cluster,
    cni_add,
    kube_authority,
    kube_cluster,
    pod_object,
)


@pytest.fixture
def authority(sim_node: SimNode, tmp_path: Path) -> Iterator[Authority]:
    with kube_authority(sim_node, tmp_path) as made:
        made.wait_ready()
        yield made


@pytest.fixture
def cluster(authority: Authority) -> Iterator[Cluster]:
    with kube_cluster(authority) as made:
        yield made


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
