"""Zero trust between simulated nodes: certificates, the mTLS tunnel, modes, and identity.

Two (and for some tests one) simulated nodes, linked by a veth pair, each running its own
`agent run` and `agent proxy` with its own state dir, node credentials from one CA
(`agent ca init` / `agent ca issue-node`) and one shared directory folder.  Pods are CNI-made;
clients are curl, iperf3, openssl-style probes; captures use tcpdump on the inter-node link.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner
from sim.ferry import FerryNode, Mesh
from sim.node import Link, Pod, SimNode, link_nodes

PROBE = Path(__file__).with_name("tls_probe.py")
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting until {what}")


@dataclass
class Cluster:
    mesh: Mesh
    a: FerryNode
    b: FerryNode
    link: Link
    client: Pod  # node a, enrolled as shop/client
    local: Pod  # node a, enrolled as shop/local, echo on 8080
    server: Pod  # node b, enrolled as shop/server, echo on 8080, tcp echo on 9000
    outsider: Pod  # node b, never enrolled


def security_flows(ferry: FerryNode, pod: Pod) -> list[dict[str, object]]:
    """The proxy's per-flow counters for one workload (direction, security, peer identity)."""
    reply = ferry.node.exec(
        [
            sys.executable,
            "-c",
            "import json,sys; from agent.admin import request; "
            f"print(json.dumps(request(__import__('pathlib').Path('{ferry.state_dir}/proxy.sock'), "
            "{'op': 'status'})))",
        ]
    )
    status = json.loads(reply.stdout)
    for entry in status["workloads"].values():
        if entry["name"] == pod.netns:
            return list(entry["flows"])
    raise AssertionError(f"{pod.netns} not served by {ferry.node.name}")


def build(
    factory: Callable[[], SimNode], workdir: Path, config: dict[str, object] | None = None
) -> Cluster:
    node_a, node_b = factory(), factory()
    link = link_nodes(node_a, node_b)
    mesh = Mesh(workdir)
    a = mesh.add(node_a, config=dict(config or {}))
    b = mesh.add(node_b, config=dict(config or {}))
    client, local = node_a.add_pod("client"), node_a.add_pod("local")
    server, outsider = node_b.add_pod("server"), node_b.add_pod("outsider")
    local.start_http_server(8080)
    server.start_http_server(8080)
    server.start_tcp_echo_server(9000)
    outsider.start_http_server(8080)
    for ferry in (a, b):
        ferry.start()
    a.enroll(client, "shop", "client")
    a.enroll(local, "shop", "local")
    b.enroll(server, "shop", "server")
    mesh.wait_directory(entries=6)  # three pods, v4 and v6 each
    return Cluster(mesh, a, b, link, client, local, server, outsider)


@pytest.fixture
def cluster(sim_node_factory: Callable[[], SimNode], tmp_path: Path) -> Iterator[Cluster]:
    built = build(sim_node_factory, tmp_path)
    try:
        yield built
    except BaseException:
        print(built.a.log_text(), built.b.log_text())
        raise


def test_cross_node_and_same_node_requests_are_mutual_tls(cluster: Cluster) -> None:
    c = cluster
    assert c.client.fetch_json(f"http://{c.server.ip4}:8080/")["peer"] == c.client.ip4
    assert c.client.fetch_json(f"http://[{c.server.ip6}]:8080/")["peer"] == c.client.ip6
    assert c.client.fetch_json(f"http://{c.local.ip4}:8080/")["peer"] == c.client.ip4
    inbound = [f for f in security_flows(c.b, c.server) if f["direction"] == "inbound"]
    assert inbound and all(f["security"] == "mtls" for f in inbound)
    assert {f["peer_identity"] for f in inbound} == {CLIENT_ID}  # what node a enrolled
    outbound = [f for f in security_flows(c.a, c.client) if f["direction"] == "outbound"]
    assert {(f["security"], f["peer_identity"]) for f in outbound} == {
        ("mtls", "spiffe://cluster.local/ns/shop/sa/server"),
        ("mtls", "spiffe://cluster.local/ns/shop/sa/local"),
    }
    status = c.b.status()
    assert status["healthy"], status["problems"]
    entry = c.b.workload(c.server)
    assert entry["security"]["mtls"] == 2 and entry["security"]["plaintext"] == 0
    assert entry["certificate"]["not_after"] > time.time() + 3600
    metrics = c.b.node.exec(["curl", "-sS", "http://127.0.0.1:15020/metrics"]).stdout
    assert 'security="mtls"' in metrics and f'source_identity="{CLIENT_ID}"' in metrics


def test_the_link_between_nodes_carries_tls_and_never_the_payload(cluster: Cluster) -> None:
    c = cluster
    pcap = c.a.node.tmpdir / "link.pcap"
    capture = c.a.node.popen(
        [
            "tcpdump",
            "--immediate-mode",
            "-i",
            c.link.ifname_a,
            "-U",
            "-s",
            "0",
            "-w",
            str(pcap),
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    tunnelled = f"tunnelled-{secrets.token_hex(8)}"
    plain = f"plaintext-{secrets.token_hex(8)}"
    c.client.fetch_json(f"http://{c.server.ip4}:8080/{tunnelled}")
    c.b.cli("unenroll", c.server.netns, check=True)  # control: the capture does see plaintext
    c.a.cli("unenroll", c.client.netns, check=True)
    c.client.fetch_json(f"http://{c.server.ip4}:8080/{plain}")
    time.sleep(0.5)
    capture.terminate()
    capture.wait(5)
    data = pcap.read_bytes()
    assert plain.encode() in data  # the capture works
    assert tunnelled.encode() not in data
    assert b"\x16\x03\x01" in data or b"\x16\x03\x03" in data  # TLS handshake records
    assert (15008).to_bytes(2, "big") in data


def probe(pod: Pod, target: str, cert: tuple[Path, Path] | None = None) -> str:
    argv = [sys.executable, str(PROBE), target, "15008"]
    if cert is not None:
        argv += [str(cert[0]), str(cert[1])]
    return str(pod.exec(argv, timeout=30).stdout.strip())


def test_tunnel_port_refuses_clients_without_a_valid_certificate(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    for name in ("valid", "expired", "rogue", "evil"):
        (tmp_path / name).mkdir()
    node_signer = NodeSigner.load(c.a.state_dir / "identity", "cluster.local")
    valid = node_signer.mint("shop", "probe", 600).write(tmp_path / "valid")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    expired = node_signer.mint("shop", "probe", 600, now=past).write(tmp_path / "expired")
    rogue_ca, evil_ca = tmp_path / "rogue-ca", tmp_path / "evil-ca"
    init_ca(rogue_ca, "cluster.local")
    issue_node(rogue_ca, "rogue", tmp_path / "rogue-node")
    rogue = NodeSigner.load(tmp_path / "rogue-node", "cluster.local").mint("shop", "server", 600)
    init_ca(evil_ca, "evil.local")
    issue_node(evil_ca, "evil", tmp_path / "evil-node")
    evil = NodeSigner.load(tmp_path / "evil-node", "evil.local").mint("shop", "server", 600)
    target = c.server.ip4
    assert probe(c.outsider, target, valid) == "accepted"  # the probe can succeed
    assert probe(c.outsider, target).startswith("refused")
    assert probe(c.outsider, target, expired).startswith("refused")
    assert probe(c.outsider, target, rogue.write(tmp_path / "rogue")).startswith("refused")
    assert probe(c.outsider, target, evil.write(tmp_path / "evil")).startswith("refused")


def test_strict_mode_never_lets_plaintext_reach_the_app(cluster: Cluster) -> None:
    c = cluster
    assert c.outsider.fetch_json(f"http://{c.server.ip4}:8080/")["peer"] == c.outsider.ip4
    c.b.cli("unenroll", c.server.netns, check=True)
    c.b.cli(
        "enroll",
        c.server.netns,
        "--namespace",
        "shop",
        "--service-account",
        "server",
        "--mode",
        "strict",
        check=True,
    )
    c.mesh.wait_directory(entries=6)
    plaintext, tunnelled = (f"/strict-{secrets.token_hex(4)}" for _ in range(2))
    refused = c.outsider.curl(f"http://{c.server.ip4}:8080{plaintext}")
    assert refused.returncode != 0
    assert c.client.fetch_json(f"http://{c.server.ip4}:8080{tunnelled}")["peer"] == c.client.ip4
    paths = [seen["path"] for seen in c.server.seen("http", 8080)]
    assert tunnelled in paths  # the app records what reaches it ...
    assert plaintext not in paths  # ... and the plaintext request never did
    entry = c.b.workload(c.server)
    assert entry["mode"] == "strict" and entry["security"]["denied"] >= 1


def test_bulk_transfer_across_nodes_through_the_tunnel(cluster: Cluster) -> None:
    c = cluster
    c.server.start_iperf3_server(5201)
    result = c.client.exec(
        ["iperf3", "-c", c.server.ip4, "-p", "5201", "-t", "2", "-J"], timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["end"]["sum_received"]["bytes"] > 5_000_000
    inbound = [f for f in security_flows(c.b, c.server) if f["direction"] == "inbound"]
    assert sum(int(str(f["bytes_received"])) for f in inbound if f["security"] == "mtls") > 5e6


def test_egress_refuse_blocks_destinations_outside_the_mesh(
    sim_node_factory: Callable[[], SimNode], tmp_path: Path
) -> None:
    c = build(sim_node_factory, tmp_path, {"mesh": {"egress": "refuse"}})
    assert c.client.curl(f"http://{c.outsider.ip4}:8080/").returncode != 0
    assert c.client.fetch_json(f"http://{c.server.ip4}:8080/")["peer"] == c.client.ip4


def test_a_long_lived_connection_survives_certificate_rotation(
    sim_node_factory: Callable[[], SimNode], tmp_path: Path
) -> None:
    c = build(sim_node_factory, tmp_path, {"identity": {"workload_cert_ttl": 120}})
    session = c.client.popen(
        [
            sys.executable,
            "-u",
            "-c",
            (
                "import socket,sys\n"
                f"s=socket.create_connection(('{c.server.ip4}',9000))\n"
                "for line in sys.stdin:\n"
                "    s.sendall(line.encode()); print(s.recv(100).decode().strip(), flush=True)\n"
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert session.stdin is not None and session.stdout is not None
    session.stdin.write("before\n")
    session.stdin.flush()
    assert session.stdout.readline().strip() == "before"
    serials = {w: c.b.workload(c.server)["certificate"]["serial"] for w in ("server",)}
    client_serial = c.a.workload(c.client)["certificate"]["serial"]

    def rotated() -> bool:
        return bool(
            c.b.workload(c.server)["certificate"]["serial"] != serials["server"]
            and c.a.workload(c.client)["certificate"]["serial"] != client_serial
        )

    wait_until(rotated, "both certificates were renewed", timeout=60)
    session.stdin.write("after\n")
    session.stdin.flush()
    assert session.stdout.readline().strip() == "after"
    session.stdin.close()
    # and new connections use the new certificates
    assert c.client.fetch_json(f"http://{c.server.ip4}:8080/")["peer"] == c.client.ip4


def test_same_node_traffic_takes_the_local_path(cluster: Cluster) -> None:
    """Both ends are served by node a's proxy: it delivers directly, with both identities,
    without a TLS handshake to itself (as ztunnel does)."""
    c = cluster
    for _ in range(3):
        assert c.client.fetch_json(f"http://{c.local.ip4}:8080/")["peer"] == c.client.ip4
    inbound = [f for f in security_flows(c.a, c.local) if f["direction"] == "inbound"]
    assert [(f["security"], f["peer_identity"], f["connections_opened"]) for f in inbound] == [
        ("mtls", CLIENT_ID, 3)
    ]
    assert c.a.status()["proxy"]["tunnel"]["handshakes"] == 0
