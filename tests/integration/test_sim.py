"""The simulated nodes themselves: pod connectivity (v4, v6, across nodes), isolation, teardown.

Everything here talks only to addresses of pods these tests created.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sim.node import NETNS_DIR, REGISTRY_DIR, SimError, SimNode, link_nodes

NodeFactory = Callable[[], SimNode]


def _links_in(netns: str | None) -> list[str]:
    """Interface names in `netns` (None: the host's netns, where this test process runs)."""
    where = ["-n", netns] if netns else []
    out = subprocess.run(
        ["ip", "-j", *where, "link", "show"], capture_output=True, text=True, check=True
    )
    return [link["ifname"] for link in json.loads(out.stdout)]


def _registry_entries() -> set[str]:
    return {p.name for p in REGISTRY_DIR.iterdir()} if REGISTRY_DIR.is_dir() else set()


def test_pod_to_pod_ipv4_server_sees_client_address(sim_node: SimNode) -> None:
    a, b = sim_node.add_pod("a"), sim_node.add_pod("b")
    b.start_http_server(8080)

    seen = a.fetch_json(f"http://{b.ip4}:8080/hello?x=1")

    assert seen["peer"] == a.ip4
    assert seen["local"] == b.ip4
    assert seen["port"] == 8080
    assert seen["path"] == "/hello?x=1"
    assert seen["name"] == "b"


def test_pod_to_pod_ipv6_server_sees_client_address(sim_node: SimNode) -> None:
    a, b = sim_node.add_pod("a"), sim_node.add_pod("b")
    b.start_http_server(8080)

    seen = a.fetch_json(f"http://[{b.ip6}]:8080/")

    assert seen["peer"] == a.ip6
    assert seen["local"] == b.ip6


def test_pods_get_addresses_from_node_subnets_and_route_only_to_node(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("web")
    assert sim_node.subnet4 is not None and sim_node.subnet6 is not None

    assert ipaddress.ip_address(pod.ip4) in sim_node.subnet4
    assert ipaddress.ip_address(pod.ip6) in sim_node.subnet6
    assert sim_node.subnet6.subnet_of(ipaddress.IPv6Network("fc00::/7"))
    routes4 = json.loads(pod.exec(["ip", "-j", "route"]).stdout)
    assert {"dst": "default", "gateway": sim_node.ip4} in [
        {"dst": r["dst"], "gateway": r.get("gateway")} for r in routes4
    ]
    # The node itself knows only its own subnets: nothing leads out of the machine.
    node_routes = json.loads(sim_node.exec(["ip", "-j", "route"]).stdout)
    node_routes += json.loads(sim_node.exec(["ip", "-j", "-6", "route"]).stdout)
    assert all(r["dst"] != "default" for r in node_routes), node_routes
    assert Path(pod.netns_path).exists()


def test_servers_nginx_iperf3_and_tcp_echo(sim_node: SimNode) -> None:
    client, server = sim_node.add_pod("client"), sim_node.add_pod("server")
    server.start_nginx(8081)
    server.start_iperf3_server(5201)
    server.start_tcp_echo_server(9000)

    assert client.curl(f"http://[{server.ip6}]:8081/").stdout == "ferry sim nginx on pod server\n"
    assert len(client.curl(f"http://{server.ip4}:8081/1k.bin").stdout) == 1024
    echoed = client.exec(["socat", "-", f"TCP:{server.ip4}:9000"], input="ping\n", timeout=10)
    assert echoed.stdout == "ping\n"
    iperf = client.exec(["iperf3", "-c", server.ip4, "-p", "5201", "-t", "1", "-J"], timeout=30)
    assert json.loads(iperf.stdout)["end"]["sum_received"]["bytes"] > 0


def test_pods_on_linked_nodes_reach_each_other(sim_node_factory: NodeFactory) -> None:
    node1, node2 = sim_node_factory(), sim_node_factory()
    link_nodes(node1, node2)
    p1, p2 = node1.add_pod("p1"), node2.add_pod("p2")
    p2.start_http_server(8080)

    assert p1.fetch_json(f"http://{p2.ip4}:8080/")["peer"] == p1.ip4  # routed, not masqueraded
    assert p1.fetch_json(f"http://[{p2.ip6}]:8080/")["peer"] == p1.ip6
    p1.start_http_server(8080)
    assert p2.fetch_json(f"http://{p1.ip4}:8080/")["name"] == "p1"


def test_unlinked_nodes_are_isolated(sim_node_factory: NodeFactory) -> None:
    node1, node2 = sim_node_factory(), sim_node_factory()
    p1, p2 = node1.add_pod("p1"), node2.add_pod("p2")
    p2.start_http_server(8080)

    assert p1.curl(f"http://{p2.ip4}:8080/", timeout=1).returncode != 0


def test_teardown_leaves_no_residue(sim_node_factory: NodeFactory) -> None:
    node, other = sim_node_factory(), sim_node_factory()
    link = link_nodes(node, other)
    pods = [node.add_pod("a"), node.add_pod("b")]
    servers = [pods[1].start_http_server(8080), pods[1].start_nginx(8081)]
    agent = node.popen(["sleep", "600"])
    netns = [node.netns, *(p.netns for p in pods)]
    tmpdir = node.tmpdir
    reserved = _registry_entries()
    assert (tmpdir / "ipam" / node.name / pods[0].ip4).exists()

    node.teardown()
    node.teardown()  # idempotent

    assert not [n for n in netns if (NETNS_DIR / n).exists()]
    assert not tmpdir.exists()
    assert not Path("/var/lib/cni/networks", node.name).exists()
    assert all(p.poll() is not None for p in [*servers, agent])
    assert link.ifname_b not in _links_in(other.netns)  # the veth pair went with the node
    assert not {link.ifname_a, link.ifname_b, node.bridge} & set(_links_in(None))
    left = _registry_entries()
    for net in (node.subnet4, node.subnet6, link.reserved4, link.subnet6):
        assert str(net).replace("/", "_") in reserved
        assert str(net).replace("/", "_") not in left


def test_remove_pod_releases_its_address(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("a")
    pod.start_http_server(8080)
    ipam = sim_node.tmpdir / "ipam" / sim_node.name

    sim_node.remove_pod(pod)

    assert not Path(pod.netns_path).exists()
    assert not (ipam / pod.ip4).exists() and not (ipam / pod.ip6).exists()
    assert sim_node.add_pod("a").ip4  # the name is free again


def test_bad_names_are_rejected_and_leave_nothing(sim_node: SimNode) -> None:
    with pytest.raises(ValueError, match="pod name"):
        sim_node.add_pod("Bad_Name")
    sim_node.add_pod("a")
    with pytest.raises(ValueError, match="already exists"):
        sim_node.add_pod("a")
    with pytest.raises(ValueError, match="prefix"):
        SimNode("no spaces")


def test_failed_process_start_reports_its_output(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("a")
    pod.start_http_server(8080)
    with pytest.raises(SimError, match="exited"):
        pod.start_http_server(8080)  # port taken: the second server dies at bind


def test_concurrent_nodes_get_distinct_subnets(sim_node_factory: NodeFactory) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        nodes = list(pool.map(lambda _: sim_node_factory(), range(4)))

    subnets = [n.subnet4 for n in nodes] + [n.subnet6 for n in nodes]
    assert len(set(subnets)) == len(subnets)
    assert len({n.netns for n in nodes}) == len({n.bridge for n in nodes}) == 4
    assert all(len(n.bridge) <= 15 for n in nodes)


def test_node_exec_runs_in_node_netns(sim_node: SimNode) -> None:
    links = sim_node.exec(["ip", "-j", "link"]).stdout
    assert [link["ifname"] for link in json.loads(links)] == ["lo"]
    assert sim_node.exec(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert sim_node.exec(["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip() == "1"


def test_teardown_copes_with_half_gone_node(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("a")
    pod.start_http_server(8080)
    subprocess.run(["ip", "netns", "del", sim_node.netns], check=True)  # as if a crash

    sim_node.teardown()

    assert not Path(pod.netns_path).exists()
    assert not sim_node.tmpdir.exists()
