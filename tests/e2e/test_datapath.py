"""End to end on a simulated node: real pods (CNI), real agent and proxy processes, real traffic.

Each test builds its own node netns with pods wired by the CNI bridge plugin, starts `agent run`
and `agent proxy` in it, enrolls pods with the CLI and talks to real servers with curl/iperf3.
"""

from __future__ import annotations

import json
import secrets
import signal
import stat
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from sim.ferry import FerryNode
from sim.node import Pod, SimNode


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting until {what}")


def opened(ferry: FerryNode, pod: Pod, direction: str) -> int:
    traffic = ferry.workload(pod)["traffic"]
    return int(traffic.get(direction, {}).get("connections_opened", 0))


BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def save(pod: Pod, family: int = 4) -> str:
    """The pod's rules and user chains, per table, as iptables-legacy-save prints them.

    Only rules and user-defined chains count: an empty table the kernel keeps after use (and
    counters, comments, table order) is not residue.
    """
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    tables: dict[str, list[str]] = {}
    table = ""
    for line in pod.exec([tool], check=True).stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A") or (
            line.startswith(":") and line[1:].split()[0] not in BUILTIN_CHAINS
        ):
            tables.setdefault(table, []).append(line)
    return "\n".join(f"*{name}\n" + "\n".join(lines) for name, lines in sorted(tables.items()))


@pytest.fixture
def mesh(sim_node: SimNode) -> Iterator[tuple[FerryNode, Pod, Pod]]:
    """A node with Ferry running and two pods: `client`, and `server` (echo on 8080 and 8081)."""
    server = sim_node.add_pod("server")
    client = sim_node.add_pod("client")
    server.start_http_server(8080)
    server.start_http_server(8081)
    ferry = FerryNode(
        sim_node,
        workers=2,
        config={
            "redirection": {"exclude_outbound_ports": [8081]},
            "agent": {"reconcile_interval": 0.5},
        },
    )
    ferry.start()
    try:
        yield ferry, client, server
    except BaseException:
        print(ferry.log_text())
        raise


def test_outbound_and_inbound_are_intercepted_and_the_app_sees_the_client(
    mesh: tuple[FerryNode, Pod, Pod],
) -> None:
    ferry, client, server = mesh
    ferry.enroll(client, "shop", "client")
    ferry.enroll(server, "shop", "server")
    reply = client.fetch_json(f"http://{server.ip4}:8080/hello")
    assert reply["peer"] == client.ip4
    assert opened(ferry, client, "outbound") == 1
    assert opened(ferry, server, "inbound") == 1
    status = ferry.status()
    assert status["healthy"], status["problems"]
    entry = ferry.workload(server)
    assert entry["redirection"] == "ok"
    assert entry["identity"] == "spiffe://cluster.local/ns/shop/sa/server"
    assert any(ip.startswith(server.ip4 + "/") for ip in entry["ips"])
    assert {(lst["direction"], lst["family"]) for lst in entry["listeners"]} == {
        ("outbound", 4),
        ("outbound", 6),
        ("inbound", 4),
        ("inbound", 6),
        ("tunnel", 4),
        ("tunnel", 6),
    }
    traffic = entry["traffic"]["inbound"]
    assert traffic["bytes_received"] > 0 and traffic["bytes_sent"] > traffic["bytes_received"]


def test_original_destination_is_preserved(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    server.start_http_server(9090)
    ferry.enroll(client)
    assert client.fetch_json(f"http://{server.ip4}:9090/x")["port"] == 9090
    assert client.fetch_json(f"http://{server.ip4}:8080/y")["port"] == 8080
    assert opened(ferry, client, "outbound") == 2


def test_excluded_port_bypasses_the_proxy(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client)
    assert client.fetch_json(f"http://{server.ip4}:8081/")["port"] == 8081
    assert opened(ferry, client, "outbound") == 0
    client.fetch_json(f"http://{server.ip4}:8080/")
    assert opened(ferry, client, "outbound") == 1


def test_loopback_and_own_ip_are_not_captured(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, _client, server = mesh
    ferry.enroll(server)
    assert server.fetch_json("http://127.0.0.1:8080/")["peer"] == "127.0.0.1"
    assert server.fetch_json(f"http://{server.ip4}:8080/")["peer"] == server.ip4
    assert opened(ferry, server, "outbound") == 0
    assert opened(ferry, server, "inbound") == 0


def test_ipv6_is_intercepted(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client)
    ferry.enroll(server)
    assert client.fetch_json(f"http://[{server.ip6}]:8080/")["peer"] == client.ip6
    assert opened(ferry, client, "outbound") == 1
    assert opened(ferry, server, "inbound") == 1


def test_bulk_transfer_through_the_proxy(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    server.start_iperf3_server(5201)
    ferry.enroll(client)
    ferry.enroll(server)
    result = client.exec(["iperf3", "-c", server.ip4, "-p", "5201", "-t", "2", "-J"], timeout=30)
    assert result.returncode == 0, result.stderr
    received = json.loads(result.stdout)["end"]["sum_received"]["bytes"]
    assert received > 10_000_000
    counted = ferry.workload(client)["traffic"]["outbound"]["bytes_received"]
    assert counted >= received


def test_proxy_down_fails_closed_and_a_restart_recovers(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    """SIGKILL: no cleanup runs.  Its workers die with it, every redirected connection, out of
    the client and into the server, is refused at once, nothing reaches the app around the
    proxy, and a restarted proxy (what systemd's Restart=always does) gets its snapshot from the
    agent and serves again."""
    ferry, client, server = mesh
    ferry.enroll(client)
    ferry.enroll(server)
    client.fetch_json(f"http://{server.ip4}:8080/")
    assert ferry.proxy is not None
    workers = psutil.Process(ferry.proxy.pid).children()
    ferry.stop(ferry.proxy, kill=True)
    wait_until(lambda: not any(alive(w) for w in workers), "its workers died with it")
    gap = f"/gap-{secrets.token_hex(4)}"
    outbound = client.curl(f"http://{server.ip4}:8080{gap}", timeout=3)
    assert outbound.returncode == 7, outbound.stderr  # refused, not a timeout, not a bypass
    inbound = ferry.node.exec(["curl", "-sS", "--max-time", "3", f"http://{server.ip4}:8080{gap}"])
    assert inbound.returncode == 7, inbound.stderr  # into the pod too
    assert not [seen for seen in server.seen("http", 8080) if seen["path"] == gap]
    result = ferry.cli("status", "--config", str(ferry.config_path))
    assert result.returncode == 1
    assert "proxy is not running" in result.stdout and "fail closed" in result.stdout
    ferry.start_proxy()
    ferry.wait_connected()
    assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4
    assert ferry.status()["healthy"]


def alive(process: psutil.Process) -> bool:
    try:
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_agent_restart_keeps_traffic_and_enrollments(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client)
    ferry.stop(ferry.agent, kill=True)
    assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4
    ferry.start_agent()
    ferry.wait_connected()
    status = ferry.status()
    assert status["healthy"], status["problems"]
    assert [w["name"] for w in status["workloads"]] == [client.netns]
    assert opened(ferry, client, "outbound") == 1  # the proxy kept its listeners and counters
    ferry.enroll(server)
    assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4


def test_drift_is_repaired(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client)
    before = save(client)
    client.exec(["iptables-legacy", "-t", "nat", "-F", "FERRY_OUTPUT"], check=True)
    wait_until(lambda: save(client) == before, "the agent re-applied the flushed chain")
    client.fetch_json(f"http://{server.ip4}:8080/")
    assert opened(ferry, client, "outbound") == 1
    agent_status = ferry.status()["agent"]
    assert agent_status["running"]


def test_status_reports_drift_read_back_from_the_kernel(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("app")
    agent = {"reconcile_interval": 3600, "loss_watch_interval": 0}  # nothing repairs the drift
    ferry = FerryNode(sim_node, config={"agent": agent})
    ferry.start()
    ferry.enroll(pod)
    pod.exec(["iptables-legacy", "-t", "nat", "-F", "FERRY_OUTPUT"], check=True)
    result = ferry.cli("status", "--config", str(ferry.config_path))
    assert result.returncode == 1
    assert "redirection is drifted" in result.stdout
    assert "REDIRECT --to-ports 15001" in result.stdout  # the missing rule is named
    assert ferry.cli("status", "--json", "--config", str(ferry.config_path)).returncode == 1


def test_deleted_netns_is_forgotten(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client)
    ferry.enroll(server)
    ferry.node.remove_pod(client)

    def forgotten() -> bool:
        names = [w["name"] for w in ferry.status()["workloads"]]
        return names == [server.netns]

    wait_until(forgotten, "the agent forgot the deleted netns")
    status = ferry.status()
    assert status["healthy"], status["problems"]
    assert "forgot default/" in ferry.log_text() and "disappeared" in ferry.log_text()


def test_enrollment_errors_change_nothing(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, _server = mesh
    missing = ferry.cli("enroll", "no-such-netns", "--namespace", "a", "--service-account", "b")
    assert missing.returncode != 0 and "'no-such-netns' does not exist" in missing.stderr
    bad = ferry.cli("enroll", client.netns, "--namespace", "Bad_NS", "--service-account", "b")
    assert bad.returncode != 0 and "'Bad_NS'" in bad.stderr
    assert save(client).count("FERRY") == 0
    ferry.enroll(client, "a", "b")
    twice = ferry.cli("enroll", client.netns, "--namespace", "a", "--service-account", "c")
    assert twice.returncode != 0 and "already enrolled as a/b" in twice.stderr
    assert ferry.workload(client)["service_account"] == "b"
    notenrolled = ferry.cli("unenroll", "no-such-netns")
    assert notenrolled.returncode != 0 and "is not enrolled" in notenrolled.stderr


def test_unenroll_removes_redirection(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    fresh = save(client)
    ferry.enroll(client)
    assert save(client) != fresh
    ferry.cli("unenroll", client.netns, check=True)
    assert save(client) == fresh
    client.fetch_json(f"http://{server.ip4}:8080/")
    assert ferry.status()["workloads"] == []


def test_enrollment_recorded_while_the_agent_is_down_applies_on_start(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("app")
    ferry = FerryNode(sim_node)
    result = ferry.cli("enroll", pod.netns, "--namespace", "a", "--service-account", "b")
    assert result.returncode == 0 and "agent is not running" in result.stdout
    assert "FERRY" not in save(pod)
    ferry.start()
    wait_until(lambda: "FERRY_OUTPUT" in save(pod), "the agent applied the recorded enrollment")
    published = (ferry.state_dir / "directory" / f"{sim_node.name}.json").read_text()
    assert f'"ip": "{pod.ip4}"' in published  # its addresses were read on start


def test_cleanup_leaves_no_residue(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    fresh4, fresh6 = save(client, 4), save(client, 6)
    rules_before = client.exec(["ip", "rule"]).stdout
    ferry.enroll(client)
    ferry.enroll(server)
    ferry.stop(ferry.agent)
    result = ferry.cli("cleanup", "--config", str(ferry.config_path))
    assert result.returncode == 0, result.stderr
    for pod in (client, server):
        assert save(pod, 4) == fresh4
        assert save(pod, 6) == fresh6
        assert pod.exec(["ip", "rule"]).stdout == rules_before
        assert pod.exec(["ip", "route", "show", "table", "100"]).stdout == ""
    assert not (ferry.state_dir / "enrollments.json").exists()
    assert not (ferry.state_dir / "directory" / f"{ferry.node.name}.json").exists()
    client.fetch_json(f"http://{server.ip4}:8080/")


def test_cleanup_refuses_while_the_agent_runs(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, _client, _server = mesh
    result = ferry.cli("cleanup")
    assert result.returncode != 0 and "stop it first" in result.stderr


def test_metrics_are_served_on_localhost(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client, "shop", "client")
    client.fetch_json(f"http://{server.ip4}:8080/")
    metrics = ferry.node.exec(["curl", "-sS", "http://127.0.0.1:15020/metrics"]).stdout
    wanted = (
        'ferry_proxy_connections_opened_total{destination_identity="unknown",'
        'direction="outbound",security="plaintext",'
        'source_identity="spiffe://cluster.local/ns/shop/sa/client",'
        f'workload="{client.netns}",workload_namespace="shop"}} 1.0'
    )
    assert wanted in metrics
    assert "ferry_proxy_received_bytes_total" in metrics
    listening = ferry.node.exec(["ss", "-Htln", "sport = :15020"]).stdout
    assert "127.0.0.1:15020" in listening and "0.0.0.0:15020" not in listening


def test_proxy_sigterm_is_clean(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, _server = mesh
    ferry.enroll(client)
    assert ferry.proxy is not None
    workers = psutil.Process(ferry.proxy.pid).children()
    assert len(workers) == 2
    ferry.proxy.send_signal(signal.SIGTERM)
    assert ferry.proxy.wait(10) == 0
    assert not (ferry.state_dir / "proxy.sock").exists()
    assert not any(w.is_running() for w in workers)


def test_dead_workers_are_restarted_with_every_workload(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, server = mesh
    ferry.enroll(client)
    assert ferry.proxy is not None
    supervisor = psutil.Process(ferry.proxy.pid)
    old = {w.pid for w in supervisor.children()}
    for worker in supervisor.children():
        worker.kill()

    def replaced() -> bool:
        fresh = [w for w in supervisor.children() if w.pid not in old and w.is_running()]
        return len(fresh) == 2

    wait_until(replaced, "the supervisor restarted both workers")
    for _ in range(4):  # connections land on either worker
        assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4
    wait_until(lambda: ferry.status()["healthy"], "status is healthy again")


def test_declared_workloads_are_enrolled_when_their_netns_exists(sim_node: SimNode) -> None:
    pod = sim_node.add_pod("app")
    late = f"{sim_node.name}-late"
    ferry = FerryNode(
        sim_node,
        config={
            "agent": {"reconcile_interval": 0.5},
            "workloads": [
                {"netns": pod.netns, "namespace": "shop", "service_account": "app"},
                {"netns": late, "namespace": "shop", "service_account": "late"},
            ],
        },
    )
    ferry.start()

    def enrolled() -> list[str]:
        return [w["name"] for w in ferry.status()["workloads"]]

    wait_until(lambda: enrolled() == [pod.netns], "the declared, existing netns is enrolled")
    assert ferry.workload(pod)["redirection"] == "ok"
    late_pod = sim_node.add_pod("late")  # the declared name appears later
    assert late_pod.netns == late
    wait_until(lambda: sorted(enrolled()) == sorted([pod.netns, late]), "the late one too")
    assert ferry.workload(late_pod)["service_account"] == "late"


def test_proxy_may_start_before_the_agent(sim_node: SimNode) -> None:
    server, client = sim_node.add_pod("server"), sim_node.add_pod("client")
    server.start_http_server(8080)
    ferry = FerryNode(sim_node)
    ferry.state_dir.mkdir(mode=0o700)
    ferry.start_proxy()
    time.sleep(0.5)  # the proxy is retrying with backoff
    ferry.start_agent()
    ferry.wait_connected()
    ferry.enroll(client)
    assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4


def test_state_dir_and_sockets_are_root_only(mesh: tuple[FerryNode, Pod, Pod]) -> None:
    ferry, client, _server = mesh
    ferry.enroll(client)
    assert stat.S_IMODE(ferry.state_dir.stat().st_mode) == 0o700
    for name in ("agent.sock", "cni.sock", "proxy.sock", "control.sock", "enrollments.json"):
        assert stat.S_IMODE((ferry.state_dir / name).stat().st_mode) == 0o600, name
