"""Proxy upgrades under load: a new `agent proxy` takes the listeners over, the old one drains.

Real simulated nodes (CNI pods, `agent run`, `agent proxy`), real clients (`sim/load.py`: one
request per new TCP connection, so every request is a connect an upgrade could drop, and
long-lived echo connections), nginx and an echo server in the pods.  The upgrade is what
systemd's ExecReload runs, `agent proxy --upgrade`, with a NOTIFY_SOCKET the test reads as
systemd would.  Each test asserts what a user would see: no failed request, open connections
that finish on the old proxy, an old proxy that leaves when they are done (or at its deadline),
a failed upgrade that changes nothing, mutual TLS across nodes throughout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes

LOAD = Path(__file__).resolve().parents[2] / "sim" / "load.py"
HTTP, ECHO = 80, 9000


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def serve(pod: Pod) -> None:
    pod.start_nginx(HTTP)
    pod.start_tcp_echo_server(ECHO)


def requests(client: Pod, server: Pod, concurrency: int = 4) -> subprocess.Popen[str]:
    """`sim/load.py requests` against the server's nginx, until `finish`."""
    argv = [sys.executable, str(LOAD), "requests", server.ip4, str(HTTP),
            "--concurrency", str(concurrency)]  # fmt: skip
    return client.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def streams(client: Pod, server: Pod, connections: int) -> subprocess.Popen[str]:
    """`sim/load.py streams` to the server's echo, open until `finish`."""
    argv = [sys.executable, str(LOAD), "streams", server.ip4, str(ECHO),
            "--connections", str(connections)]  # fmt: skip
    return client.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def finish(load: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = load.communicate(input="", timeout=30)
    result: dict[str, Any] = json.loads(out)
    return result


def gone_at(pid: int, timeout: float) -> float:
    """When process `pid` ended (a zombie has ended), waiting at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.time()
        except psutil.NoSuchProcess:
            return time.time()
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after {timeout} s")


def active(ferry: FerryNode) -> int:
    return int(ferry.status()["proxy"].get("active_connections", 0))


@contextmanager
def systemd_notify_socket() -> Iterator[tuple[dict[str, str], list[str]]]:
    """A NOTIFY_SOCKET as systemd binds it: the environment to pass, and what arrives."""
    directory = tempfile.mkdtemp(prefix="ferry-notify-")  # short: a socket path is < 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    received: list[str] = []
    try:
        yield {"NOTIFY_SOCKET": path}, received
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def node_with_ferry(node: SimNode, proxy: dict[str, float]) -> tuple[FerryNode, Pod, Pod]:
    server, client = node.add_pod("server"), node.add_pod("client")
    serve(server)
    ferry = FerryNode(node, workers=2, config={"proxy": proxy})
    ferry.start()
    ferry.enroll(client, "shop", "client")
    ferry.enroll(server, "shop", "server")
    return ferry, client, server


def test_an_upgrade_under_load_fails_no_request_and_open_connections_finish_on_the_old_proxy(
    sim_node: SimNode,
) -> None:
    drain = 5.0
    ferry, client, server = node_with_ferry(sim_node, {"drain_timeout": drain})
    try:
        old = ferry.proxy_pid()
        load = requests(client, server)
        finishing, endless = streams(client, server, 3), streams(client, server, 1)
        wait_until(lambda: active(ferry) >= 4, "the long-lived connections are open")
        with systemd_notify_socket() as (env, notified):
            begun = time.time()
            upgrade = ferry.upgrade_proxy(env)
            assert upgrade.wait(60) == 0, ferry.upgrade_output()
            took_over = time.time()
            new = ferry.proxy_pid()
        assert new != old and "ok: proxy pid" in ferry.upgrade_output()
        assert notified == [f"MAINPID={new}\nREADY=1"]  # systemd: the new one is the unit's
        time.sleep(0.5)
        done = finish(finishing)  # the old proxy's connections end when their clients say so
        old_gone = gone_at(old, drain + 10)
        cut = finish(endless)
        served = finish(load)
    except BaseException:
        print(ferry.log_text())
        raise
    assert served["failed"] == 0, served["errors"]
    during = [t for t in served["ends"] if begun <= t <= old_gone]
    assert len(during) >= 20, (len(during), old_gone - begun)  # served while both ran
    for stream in done["streams"]:
        assert stream["ok"], stream
        assert stream["started"] < begun and stream["ended"] > took_over  # lived through it
    # never ended by its client: cut at the deadline, which runs from when the old proxy stopped
    # accepting (between `begun` and `took_over`)
    (outlived,) = cut["streams"]
    assert not outlived["ok"], outlived
    assert begun + drain < outlived["ended"] < took_over + drain + 3, outlived
    assert begun + drain < old_gone < took_over + drain + 3, (old_gone - begun, took_over - begun)
    status = ferry.status()
    assert status["healthy"], status["problems"]
    assert [p["pid"] for p in status["agent"]["proxies"]] == [new]  # the agent sees one proxy
    assert client.curl(f"http://{server.ip4}:{HTTP}/").returncode == 0


def test_a_pod_s_old_proxy_deleted_while_it_drains_ends_with_its_connections(
    sim_node: SimNode,
) -> None:
    """The DaemonSet's update (deploy/base/proxy.yaml, `proxy.exit_after_drain: false`): the
    old pod is deleted (SIGTERM) as soon as the new proxy serves, while the old one drains; it
    lets its connections finish, then exits 0 at once, not idle until the kubelet's SIGKILL."""
    drain = 10.0
    ferry, client, server = node_with_ferry(
        sim_node, {"drain_timeout": drain, "exit_after_drain": False}
    )
    assert ferry.proxy is not None
    try:
        load = requests(client, server)
        finishing = streams(client, server, 2)
        wait_until(lambda: active(ferry) >= 2, "the long-lived connections are open")
        upgrade = ferry.upgrade_proxy()
        assert upgrade.wait(60) == 0, ferry.upgrade_output()
        ferry.proxy.send_signal(signal.SIGTERM)  # the controller deletes the old pod
        time.sleep(1.0)
        assert ferry.proxy.poll() is None  # draining: SIGTERM waits for its connections
        done = finish(finishing)
        ended = time.monotonic()
        assert ferry.proxy.wait(drain) == 0
        gone = time.monotonic()
        served = finish(load)
    except BaseException:
        print(ferry.log_text())
        raise
    assert served["failed"] == 0, served["errors"]
    assert all(stream["ok"] for stream in done["streams"]), done["streams"]
    assert gone - ended < drain / 2  # once they ended, not at the deadline or later
    assert client.curl(f"http://{server.ip4}:{HTTP}/").returncode == 0


def test_a_new_proxy_that_cannot_take_over_rolls_back_and_no_request_fails(
    sim_node: SimNode,
) -> None:
    ferry, client, server = node_with_ferry(sim_node, {"handoff_timeout": 3.0})
    assert ferry.agent is not None
    old = ferry.proxy_pid()
    load = requests(client, server)
    os.kill(ferry.agent.pid, signal.SIGSTOP)  # no snapshot for a new proxy: it cannot finish
    try:
        crashing = ferry.upgrade_proxy()
        wait_until(lambda: "inherited the listeners" in ferry.upgrade_output(),
                   "the new proxy holds the listeners")  # fmt: skip
        (new,) = [p for p in psutil.process_iter(["cmdline"])
                  if "--report-fd" in (p.info["cmdline"] or ())
                  and str(ferry.state_dir) in p.info["cmdline"]]  # fmt: skip
        new.kill()  # a new version that crashes half-way
        assert crashing.wait(30) == 1
        assert "exited before it took over" in ferry.upgrade_output()
        stalled = ferry.upgrade_proxy()  # this one never gets its snapshot
        assert stalled.wait(60) == 1
        assert "(the running proxy serves on)" in ferry.upgrade_output()
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        os.kill(ferry.agent.pid, signal.SIGCONT)
    ferry.wait_connected()  # the old proxy took the agent link back
    served = finish(load)
    assert served["failed"] == 0, served["errors"]
    assert served["served"] > 50
    assert ferry.proxy_pid() == old
    status = ferry.status()
    assert status["healthy"], status["problems"]
    assert client.curl(f"http://{server.ip4}:{HTTP}/").returncode == 0


def test_upgrading_both_ends_of_a_tunnel_fails_no_request(
    sim_node_factory: Callable[[], SimNode], tmp_path: Path
) -> None:
    node_a, node_b = sim_node_factory(), sim_node_factory()
    link_nodes(node_a, node_b)
    mesh = Mesh(tmp_path)
    a, b = (mesh.add(node, workers=2, config={"proxy": {"drain_timeout": 30.0}})
            for node in (node_a, node_b))  # fmt: skip
    client, server = node_a.add_pod("client"), node_b.add_pod("server")
    serve(server)
    a.start()
    b.start()
    a.enroll(client, "shop", "client")
    b.enroll(server, "shop", "server")
    mesh.wait_directory(entries=4)
    try:
        load = requests(client, server)
        tunnelled = streams(client, server, 2)
        wait_until(lambda: active(b) >= 2, "the long-lived connections are open")
        old_b = b.proxy_pid()
        assert b.upgrade_proxy().wait(60) == 0, b.upgrade_output()  # the tunnel's server end
        # a's pooled connections to the old proxy got a GOAWAY: new streams go to the new one
        wait_until(lambda: inbound_mtls(b, server) > 0, "the new proxy on b takes tunnels")
        old_a = a.proxy_pid()
        assert a.upgrade_proxy().wait(60) == 0, a.upgrade_output()  # and its client end
        time.sleep(0.5)
        closed = time.time()
        done = finish(tunnelled)  # they lived on the old proxies on both ends
        old_gone = [gone_at(pid, 20) for pid in (old_b, old_a)]
        served = finish(load)
    except BaseException:
        print(a.log_text(), b.log_text())
        raise
    assert served["failed"] == 0, served["errors"]
    assert served["served"] > 100
    assert all(stream["ok"] for stream in done["streams"]), done
    assert max(old_gone) < closed + 5  # drained when their last connection ended, not at 30 s
    assert inbound_mtls(b, server) > 0
    for ferry in (a, b):
        status = ferry.status()
        assert status["healthy"], status["problems"]


def inbound_mtls(ferry: FerryNode, pod: Pod) -> int:
    """Tunnelled connections the serving proxy opened to `pod` so far."""
    traffic = ferry.workload(pod)
    return int(traffic["security"]["mtls"]) if traffic.get("security") else 0
