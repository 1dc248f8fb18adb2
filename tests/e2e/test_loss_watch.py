"""Surviving the host: every pod's rules and routes lost while agent and proxy run, repaired
within 2 s by the loss watch (`agent.redirect.watch`), not after a reconcile period.

A simulated node (CNI pods, real `agent run` and `agent proxy`) whose reconcile loop runs once
an hour, so only the watch can repair: in every enrolled pod the tables are flushed and Ferry's
route table emptied (what a reboot-like loss, or a careless `iptables -F`, does), or, on the
nftables backend, `nft flush ruleset`.  Traffic must pass the proxy again within 2 s and
`agent status` must count the repairs.  (A proxy killed outright leaves pods failing closed:
tests/e2e/test_datapath.py and test_backends.py kill it with SIGKILL.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from sim.ferry import FerryNode
from sim.node import Pod, SimNode
from tests.e2e.test_datapath import save, wait_until

PODS = 3
REPAIR_WITHIN = 2.0  # seconds


def lose_everything(backend: str, pod: Pod) -> None:
    """What a reboot-like loss leaves in the pod: no rules, and Ferry's route table empty."""
    if backend == "nftables":
        rules = ["nft flush ruleset"]
    else:
        rules = [f"{tool} -t {table} -F" for tool in ("iptables-legacy", "ip6tables-legacy")
                 for table in ("nat", "mangle")]  # fmt: skip
    routes = [f"ip {family} route flush table 100" for family in ("-4", "-6")]
    pod.exec(["sh", "-ec", "; ".join(rules + routes)], check=True)


def intercepted(ferry: FerryNode, client: Pod, server: Pod) -> bool:
    """A new request from client to server went through the proxy (its metrics count it)."""
    before = relayed(ferry, client)
    client.fetch_json(f"http://{server.ip4}:8080/")
    return relayed(ferry, client) > before


def relayed(ferry: FerryNode, pod: Pod) -> int:
    """Outbound connections the proxy opened for `pod`, from its metrics endpoint."""
    metrics = ferry.node.exec(["curl", "-sS", "http://127.0.0.1:15020/metrics"]).stdout
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in metrics.splitlines()
        if line.startswith("ferry_proxy_connections_opened_total{")
        and 'direction="outbound"' in line
        and f'workload="{pod.netns}"' in line
    )


def state(backend: str, pod: Pod) -> str:
    nft = pod.exec(["nft", "list", "ruleset"]).stdout if backend == "nftables" else ""
    route = pod.exec(["ip", "route", "show", "table", "100"]).stdout
    return f"{save(pod, 4)}{save(pod, 6)}{nft}{route}"


@pytest.fixture
def pods(sim_node: SimNode) -> Iterator[tuple[SimNode, Pod, list[Pod]]]:
    server = sim_node.add_pod("server")
    server.start_http_server(8080)
    yield sim_node, server, [sim_node.add_pod(f"client{i}") for i in range(PODS)]


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_every_pod_losing_its_rules_is_repaired_within_2s(
    backend: str, pods: tuple[SimNode, Pod, list[Pod]]
) -> None:
    sim_node, server, clients = pods
    ferry = FerryNode(
        sim_node,
        config={"redirection": {"backend": backend}, "agent": {"reconcile_interval": 3600}},
    )
    ferry.start()
    try:
        for pod in [server, *clients]:
            ferry.enroll(pod)
        installed = {pod.netns: state(backend, pod) for pod in [server, *clients]}
        assert all(intercepted(ferry, client, server) for client in clients)
        wait_until(lambda: ferry.status()["agent"]["loss_watch"]["applied"] >= PODS + 1,
                   "the watch found every pod healthy once")  # fmt: skip

        log = ferry.logs / "run.log"
        lost = time.monotonic()
        for pod in [server, *clients]:
            lose_everything(backend, pod)
        wait_until(lambda: log.read_text().count("loss watch: repaired") >= PODS + 1,
                   "every pod repaired", timeout=REPAIR_WITHIN)  # fmt: skip
        assert time.monotonic() - lost < REPAIR_WITHIN
        assert {pod.netns: state(backend, pod) for pod in [server, *clients]} == installed
        assert all(intercepted(ferry, client, server) for client in clients)

        watch = ferry.status()["agent"]["loss_watch"]
        assert watch["repairs"] >= PODS + 1, watch
        enrolled = {f"default/{pod.netns}" for pod in [server, *clients]}
        assert watch["last_repair"]["workload"] in enrolled
        assert watch["last_repair"]["lost"] in {"rules, routing", "rules", "routing"}
        assert ferry.status()["agent"]["last_reconcile"]["actions"] == []  # the watch, not it
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)


CHURN_CYCLES = 20


def test_pods_coming_and_going_are_no_loss_for_the_steady_pods(
    pods: tuple[SimNode, Pod, list[Pod]],
) -> None:
    """With traffic flowing between two enrolled pods, enrolling and unenrolling other pods
    (the churn soak's shape) is never taken for a loss: nothing is "repaired" (not the steady
    pods, not a pod sampled while its enrollment was still being applied) and no request fails.
    The watch ticks every 50 ms here, so it looks often while an enrollment is under way."""
    sim_node, server, (client, *_) = pods
    ferry = FerryNode(sim_node, config={"agent": {"reconcile_interval": 3600,
                                                  "loss_watch_interval": 0.05}})  # fmt: skip
    ferry.start()
    served, failed = [0], [""]
    stop = threading.Event()

    def steady_traffic() -> None:
        while not stop.is_set():
            result = client.curl(f"http://{server.ip4}:8080/", timeout=3.0, args=["--fail"])
            if result.returncode:
                failed.append(result.stderr.strip())
            else:
                served[0] += 1

    traffic = threading.Thread(target=steady_traffic)
    try:
        for pod in (server, client):
            ferry.enroll(pod)
        assert intercepted(ferry, client, server)
        traffic.start()
        for cycle in range(CHURN_CYCLES):
            churned = sim_node.add_pod(f"churn{cycle}")
            try:
                ferry.enroll(churned)
                ferry.cli("unenroll", churned.netns, check=True)
            finally:
                sim_node.remove_pod(churned)
        stop.set()
        traffic.join()
        assert failed == [""], failed
        assert served[0] > CHURN_CYCLES
        assert "loss watch: repaired" not in (ferry.logs / "run.log").read_text()
        watch = ferry.status()["agent"]["loss_watch"]
        assert watch["repairs"] == 0 and watch["failures"] == 0, watch
        assert intercepted(ferry, client, server)
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        stop.set()
        if traffic.is_alive():
            traffic.join()
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
