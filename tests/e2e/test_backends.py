"""End to end per redirection backend, and a node switching backends under live pods.

A simulated node (CNI pods, real `agent run` and `agent proxy`, curl against echo servers), as
in test_datapath.py, which runs the iptables backend through every scenario; here the nftables
and eBPF backends each go through the ones where backends differ: interception both ways with
the client's address kept (the return path), the original destination, an excluded port, IPv6,
an agent restart (traffic goes on, nothing reapplied) and a proxy killed and restarted (fail
closed, then served), drift repair after someone flushes the pod's ruleset or deletes Ferry's
table (nftables) or detaches its programs (eBPF), and `agent cleanup` without residue (nft
tables, iptables chains, routing, the sysctl, bpffs pins, attached links and loaded programs).
Then one node moves its enrolled pods from iptables to nftables, to eBPF and back by restarting
the agent with `--backend`, with traffic checked after each switch and none of the old
backend's rules left.

`ip netns exec` gives each process a private mount namespace with a fresh /sys, where no cgroup
v2 hierarchy is mounted and a bpffs mounted by the agent is invisible to the proxy;
`sim.ferry.HostMountsFerry` runs Ferry in the node's netns but in the test's own mount namespace
(as a DaemonSet with the host's /sys/fs mounted does), so the eBPF backend runs there.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import psutil
import pytest

from agent.proxy.fastpath import FLOW_KEY, JOIN
from agent.redirect import bpf_syscall as bpf
from agent.redirect import ebpf
from agent.redirect.ebpf_object import load_or_compile
from sim.ferry import FerryNode, HostMountsFerry
from sim.node import Pod, SimNode
from tests.e2e.test_datapath import save, wait_until


def nft(pod: Pod) -> str:
    """The pod's whole nftables ruleset, as `nft list ruleset` prints it."""
    return str(pod.exec(["nft", "list", "ruleset"], check=True).stdout)


def routing(pod: Pod) -> str:
    """The pod's policy rules and Ferry's route table (`ip route` fails when it is empty)."""
    return "".join(
        pod.exec(["ip", *args]).stdout
        for args in (["-4", "rule"], ["-6", "rule"], ["route", "show", "table", "100"])
    )


def relayed(ferry: FerryNode, client: Pod, server: Pod) -> tuple[int, int]:
    """Connections the proxy relayed, from its metrics (no CLI start per look): the client's
    outbound and the server's inbound."""
    metrics = ferry.node.exec(["curl", "-sS", "http://127.0.0.1:15020/metrics"]).stdout

    def opened(pod: Pod, direction: str) -> int:
        labels = (f'direction="{direction}"', f'workload="{pod.netns}"')
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in metrics.splitlines()
            if line.startswith("ferry_proxy_connections_opened_total{")
            and all(label in line for label in labels)
        )

    return opened(client, "outbound"), opened(server, "inbound")


def through_proxy(ferry: FerryNode, client: Pod, server: Pod) -> None:
    """A request from client to server passes the proxy both ways and the app sees the client."""
    out, inb = relayed(ferry, client, server)
    assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4
    assert relayed(ferry, client, server) == (out + 1, inb + 1)


@pytest.fixture(scope="module")
def bpf_object() -> None:
    """The eBPF object compiled (once per session, cached) before an agent needs it."""
    load_or_compile(Path(os.environ[ebpf.CACHE_ENV]))


@pytest.fixture
def node(sim_node: SimNode) -> Iterator[tuple[SimNode, Pod, Pod]]:
    server = sim_node.add_pod("server")
    client = sim_node.add_pod("client")
    server.start_http_server(8080)
    server.start_http_server(8081)
    server.start_http_server(9090)
    yield sim_node, client, server


def residue(pod: Pod) -> tuple[str, ...]:
    """Everything a backend may leave in a pod: nft ruleset, iptables chains, routing, sysctl."""
    fwmark = pod.exec(["sysctl", "-n", "net.ipv4.tcp_fwmark_accept"], check=True).stdout
    return nft(pod), save(pod, 4), save(pod, 6), routing(pod), fwmark


def links(ferry: FerryNode) -> dict[str, bpf.LinkInfo]:
    """The eBPF backend's pinned links by pin name, as the kernel describes them (a link the
    agent is replacing right now may be missing)."""
    found = {}
    for path in sorted((ebpf.pin_root(ferry.state_dir) / "links").glob("*")):
        try:
            fd = bpf.obj_get(path)
        except FileNotFoundError:
            continue
        try:
            found[path.name] = bpf.link_info(fd)
        finally:
            os.close(fd)
    return found


def gone(kind: str, ident: int) -> Callable[[], bool]:
    """Whether the kernel no longer has the BPF `kind` (link, prog) with this id."""
    argv = ["bpftool", kind, "show", "id", str(ident)]
    return lambda: subprocess.run(argv, capture_output=True).returncode != 0


def attached(ferry: FerryNode, name: str) -> bool:
    link = links(ferry).get(name)
    return link is not None and link.target != 0


def vandalise(backend: str, ferry: FerryNode, pod: Pod) -> Iterator[str]:
    """Break the pod's redirection the ways an operator or another tool might, one at a time,
    yielding what was done once the agent has repaired it."""
    if backend == "nftables":
        installed = nft(pod)
        for vandalism in (["flush", "ruleset"], ["delete", "table", "inet", "ferry"]):
            pod.exec(["nft", *vandalism], check=True)
            wait_until(lambda: nft(pod) == installed, f"the agent repaired `nft {vandalism}`")
            yield f"nft {vandalism}"
        return
    for name in ("cgroup-connect4", *[n for n in links(ferry) if n.startswith("netns-")]):
        fd = bpf.obj_get(ebpf.pin_root(ferry.state_dir) / "links" / name)
        try:
            bpf.link_detach(fd, name)  # what `bpftool link detach` does
        finally:
            os.close(fd)
        wait_until(partial(attached, ferry, name), f"the agent reattached {name}")
        yield f"detached {name}"


@pytest.mark.usefixtures("bpf_object")
@pytest.mark.parametrize("backend", ["nftables", "ebpf"])
def test_backend_end_to_end(backend: str, node: tuple[SimNode, Pod, Pod]) -> None:
    sim_node, client, server = node
    fresh = residue(client), residue(server)
    ferry = HostMountsFerry(
        sim_node,
        config={
            "redirection": {"backend": backend, "exclude_outbound_ports": [8081]},
            "agent": {"reconcile_interval": 0.5},
        },
    )
    ferry.start()
    try:
        ferry.enroll(client, "shop", "client")
        ferry.enroll(server, "shop", "server")
        status = ferry.status()
        assert status["healthy"], status["problems"]
        assert status["backend"] == backend
        assert status["backend_reason"].startswith(f"redirection.backend is {backend}")
        assert "FERRY" not in save(client)
        assert ("table inet ferry" in nft(client)) == (backend == "nftables")

        through_proxy(ferry, client, server)
        out, inb = relayed(ferry, client, server)
        assert client.fetch_json(f"http://{server.ip4}:9090/")["port"] == 9090
        assert client.fetch_json(f"http://[{server.ip6}]:8080/")["peer"] == client.ip6
        assert client.fetch_json(f"http://{server.ip4}:8081/")["port"] == 8081
        # 8081 is excluded from the client's outbound only: the server's inbound still takes it
        assert relayed(ferry, client, server) == (out + 2, inb + 3)

        installed = residue(client), residue(server)
        ferry.stop(ferry.agent)  # the proxy serves on with the agent down; nothing is undone
        through_proxy(ferry, client, server)
        ferry.start_agent()
        wait_until(lambda: ferry.status()["healthy"], "the restarted agent is healthy")
        assert (residue(client), residue(server)) == installed
        through_proxy(ferry, client, server)

        ferry.stop(ferry.proxy, kill=True)
        refused = client.curl(f"http://{server.ip4}:8080/", timeout=3)
        assert refused.returncode == 7, refused.stderr  # fail closed: refused, never bypassed
        ferry.start_proxy()
        wait_until(lambda: ferry.status()["healthy"], "the restarted proxy serves")
        through_proxy(ferry, client, server)

        for _done in vandalise(backend, ferry, client):
            through_proxy(ferry, client, server)

        pinned = links(ferry)
        ferry.stop(ferry.agent)
        result = ferry.cli("cleanup", "--config", str(ferry.config_path))
        assert result.returncode == 0, result.stderr
        assert (residue(client), residue(server)) == fresh
        assert not ebpf.pin_root(ferry.state_dir).exists()
        for link in pinned.values():
            wait_until(gone("link", link.id), f"link {link.id} is gone")
            wait_until(gone("prog", link.prog_id), f"program {link.prog_id} is gone")
        assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
        ebpf.cleanup(ferry.state_dir)


HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
for i in range(3):
    s.sendall(b"ping %d\\n" % i)
    echo = b""
    while not echo.endswith(b"\\n"):
        echo += s.recv(100)
    assert echo == b"ping %d\\n" % i, echo
print("ready", flush=True)
try:
    print("closed", s.recv(100), flush=True)
except OSError as exc:
    print("closed", type(exc).__name__, flush=True)
"""
STREAM = """
import hashlib, random, socket, sys, threading, time
# Writes from the moment of connect, back to back, so the proxy still holds earlier bytes when it
# offers the join and the kernel is asked to switch; then writes of random sizes with random
# pauses. The echo (switched too) must come back byte for byte.
rng = random.Random(int(sys.argv[3]))
data = rng.randbytes(4 << 20)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(data[:1 << 16])
s.sendall(data[1 << 16:1 << 20])
got = bytearray()
def read():
    while len(got) < len(data):
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        got.extend(chunk)
reader = threading.Thread(target=read)
reader.start()
sent = 1 << 20
while sent < len(data):
    size = rng.choice((1, 100, 1500, 65536, 300000))
    s.sendall(data[sent:sent + size])
    sent += size
    if rng.random() < 0.2:
        time.sleep(rng.random() / 100)
reader.join()
print(len(got), hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), flush=True)
"""
DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-client, namespace: shop}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: ["{ip}"]}}}}]}}]
"""


def kernel_seconds(pid: int) -> float:
    """System CPU time of the proxy (the supervisor and its workers): where moving bytes costs
    (splice), unlike its Python time, which goes with connections and stats, not bytes."""
    proxy = psutil.Process(pid)
    return float(sum(p.cpu_times().system for p in (proxy, *proxy.children(recursive=True))))


APP_STATE = struct.Struct("=QQQ")  # struct app_state in bpf/ferry.c: passed, target, pushed


def joined(ferry: FerryNode) -> int:
    """How many open app sockets (in the `apps` SOCKHASH, which a socket leaves as it closes)
    the kernel has switched to the fast path (their `app_state` has a target)."""
    maps = ebpf.pin_root(ferry.state_dir) / "maps"
    apps, state = bpf.obj_get(maps / "apps"), bpf.obj_get(maps / "app_state")
    try:
        values = (
            bpf.map_lookup(state, key, APP_STATE.size) for key in bpf.map_keys(apps, FLOW_KEY.size)
        )
        return sum(1 for v in values if v is not None and APP_STATE.unpack(v)[1] != 0)
    finally:
        os.close(apps)
        os.close(state)


def switches(ferry: FerryNode) -> int:
    """How many app sockets the kernel has switched to the fast path so far."""
    fd = bpf.obj_get(ebpf.pin_root(ferry.state_dir) / "maps" / "switches")
    try:
        value = bpf.map_lookup(fd, bytes(4), 8)
        assert value is not None
        return int.from_bytes(value, "little")
    finally:
        os.close(fd)


@pytest.mark.usefixtures("bpf_object")
def test_joined_connections_deliver_every_response(node: tuple[SimNode, Pod, Pod]) -> None:
    """wrk with `Connection: close` through the fast path: nginx's responses go into the
    proxy's socket in the kernel, and every one arrives whole before its connection ends (no
    read errors), at thousands of connections in a few seconds."""
    sim_node, client, server = node
    server.start_nginx(8082)
    config = {"redirection": {"backend": "ebpf", "kernel_fastpath": True}}
    ferry = HostMountsFerry(sim_node, config=config)
    ferry.start()
    try:
        ferry.enroll(client, "shop", "client")
        ferry.enroll(server, "shop", "server")
        url = f"http://{server.ip4}:8082/1k.bin"
        argv = ["wrk", "-t1", "-c8", "-d3s", "-H", "Connection: close", url]
        result = client.exec(argv, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "Socket errors" not in result.stdout, result.stdout  # no response cut short
        assert "Non-2xx" not in result.stdout, result.stdout
        requests = int(result.stdout.split(" requests in ")[0].split()[-1])
        assert requests >= 2000, result.stdout
        assert switches(ferry) >= requests, "the responses went through the kernel"
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
        ebpf.cleanup(ferry.state_dir)


def test_the_proxy_and_the_kernel_agree_on_the_fast_path_maps() -> None:
    """The proxy writes `joins` and `legs` by hand (agent.proxy.fastpath): their key and value
    sizes are the compiled object's."""
    obj = load_or_compile(Path(os.environ[ebpf.CACHE_ENV]))
    maps = {spec.name: spec for spec in obj.maps}
    assert (maps["joins"].key_size, maps["joins"].value_size) == (FLOW_KEY.size, JOIN.size)
    assert (maps["app_state"].key_size, maps["app_state"].value_size) == (
        FLOW_KEY.size,
        APP_STATE.size,
    )
    assert maps["legs"].key_size == maps["leg_acked"].key_size == 8


@pytest.mark.usefixtures("bpf_object")
def test_a_slow_reader_holds_back_a_switched_nginx_without_stalling_it(
    node: tuple[SimNode, Pod, Pod],
) -> None:
    """nginx (edge-triggered, nonblocking) sends 48 MiB through the fast path to curl reading
    at 24 MiB/s: once the proxy's socket holds a backlog, nginx's sends go the ordinary way and
    its own socket wakes it as it drains, so the download ends in about two seconds, whole.
    Pushing into a full proxy socket would fail nginx's send with EAGAIN and no wakeup would
    follow: it stalled after a few MiB until its send timeout."""
    sim_node, client, server = node
    server.start_nginx(8082)
    size = 48 << 20
    (sim_node.tmpdir / f"nginx-{server.name}-8082" / "www" / "big.bin").write_bytes(bytes(size))
    ferry = HostMountsFerry(sim_node, config={"redirection": {"backend": "ebpf"}})
    ferry.start()
    try:
        ferry.enroll(client, "shop", "client")
        ferry.enroll(server, "shop", "server")
        url = f"http://{server.ip4}:8082/big.bin"
        argv = ["curl", "-sS", "--max-time", "20", "--limit-rate", "24M", "-o", "/dev/null",
                "-w", "%{size_download} %{http_code}", url]  # fmt: skip
        result = client.exec(argv, timeout=30)
        assert result.stdout == f"{size} 200", (result.stdout, result.stderr)
        assert switches(ferry) >= 1, "nginx's sends went through the kernel"
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
        ebpf.cleanup(ferry.state_dir)


@pytest.mark.usefixtures("bpf_object")
def test_same_node_connections_are_joined_in_the_kernel(
    node: tuple[SimNode, Pod, Pod], tmp_path: Path
) -> None:
    """With eBPF and `kernel_fastpath`, an uninspected same-node connection's bytes go from
    socket to socket in the kernel: they flow in order both ways, the proxy's CPU does not grow
    with them, they are still counted, and a policy that denies the connection still closes
    it."""
    sim_node, client, server = node
    server.start_iperf3_server(5201)
    server.start_tcp_echo_server(7000)
    policies = tmp_path / "policies"
    policies.mkdir()
    config = {
        "redirection": {"backend": "ebpf", "kernel_fastpath": True},
        "policy": {"directory": str(policies)},
    }
    ferry = HostMountsFerry(sim_node, config=config)
    ferry.start()
    try:
        ferry.enroll(client, "shop", "client")
        ferry.enroll(server, "shop", "server")
        assert ferry.proxy is not None
        before = kernel_seconds(ferry.proxy.pid)
        argv = ["iperf3", "-c", server.ip4, "-p", "5201", "-t", "2", "-J"]
        result = client.exec(argv, timeout=30)
        assert result.returncode == 0, result.stderr
        received = json.loads(result.stdout)["end"]["sum_received"]["bytes"]
        per_gb = (kernel_seconds(ferry.proxy.pid) - before) / (received / 1e9)
        assert received > 100_000_000
        assert per_gb < 0.1, f"the proxy moved bytes: {per_gb:.3f} system CPU s/GB"  # splice 0.2+
        counted = ferry.workload(client)["traffic"]["outbound"]["bytes_received"]
        assert counted >= received

        before = switches(ferry)
        addresses = (server.ip4, server.ip4, server.ip6, server.ip6)
        for seed, address in enumerate(addresses):  # switched while the proxy holds bytes
            result = client.exec([sys.executable, "-c", STREAM, address, "7000", str(seed)])
            assert result.stdout == f"{4 << 20} True\n", (result.stdout, result.stderr)
        assert switches(ferry) >= before + 4, "the streams went through the kernel"

        hold = client.popen([sys.executable, "-c", HOLD, server.ip4, "7000"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert hold.stdout is not None
        assert hold.stdout.readline() == "ready\n"  # echoed in order, through the kernel
        assert joined(ferry) == 2
        (policies / "deny.yaml").write_text(DENY_CLIENT.format(ip=client.ip4))
        assert hold.stdout.readline().startswith("closed"), "revoked"
        wait_until(lambda: joined(ferry) == 0, "the closed sockets left the map")
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
        ebpf.cleanup(ferry.state_dir)


@pytest.mark.usefixtures("bpf_object")
def test_switching_backends_migrates_every_pod(node: tuple[SimNode, Pod, Pod]) -> None:
    sim_node, client, server = node
    fresh = residue(client), residue(server)
    ferry = HostMountsFerry(sim_node, workers=2, config={"agent": {"reconcile_interval": 0.5}})
    ferry.start_agent("--backend", "iptables")
    ferry.start_proxy()
    ferry.wait_connected()
    try:
        ferry.enroll(client, "shop", "client")
        ferry.enroll(server, "shop", "server")
        assert "FERRY_OUTPUT" in save(client) and nft(client) == fresh[0][0]
        through_proxy(ferry, client, server)

        for backend in ("nftables", "ebpf", "iptables"):
            ferry.stop(ferry.agent)  # the proxy keeps serving; the rules stay in place
            ferry.start_agent("--backend", backend)

            def migrated(want: str = backend) -> bool:
                """Both pods hold the rules of `want` and of no other backend."""
                for pod in (client, server):
                    fwmark = pod.exec(["sysctl", "-n", "net.ipv4.tcp_fwmark_accept"]).stdout
                    holds = {
                        "iptables": "FERRY_OUTPUT" in save(pod),
                        "nftables": "inet ferry" in nft(pod),
                        "ebpf": fwmark == "1\n",
                    }
                    if [name for name, there in holds.items() if there] != [want]:
                        return False
                return bool(ferry.status()["healthy"])

            wait_until(migrated, f"both pods were moved to {backend}")
            status = ferry.status()
            assert status["backend"] == backend
            assert status["backend_reason"].startswith(f"--backend is {backend}")
            assert [w["redirection"] for w in status["workloads"]] == ["ok", "ok"]
            assert f"backend {backend} (--backend is {backend}" in ferry.cli("status").stdout
            pinned = sorted(name.split("-")[0] for name in links(ferry))
            assert pinned == (["cgroup"] * 4 + ["netns"] * 2 if backend == "ebpf" else []), pinned
            through_proxy(ferry, client, server)

        ferry.cli("unenroll", client.netns, check=True)
        assert residue(client) == fresh[0]
    except BaseException:
        print(ferry.log_text())
        print(json.dumps(ferry.status(), indent=1)[:4000])
        raise
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
        ebpf.cleanup(ferry.state_dir)


def test_a_backend_that_cannot_run_stops_the_agent_with_why(sim_node: SimNode) -> None:
    """The agent runs under `ip netns exec`, whose mount namespace shows no cgroup v2
    hierarchy, so eBPF cannot run there."""
    ferry = FerryNode(sim_node)
    result = ferry.cli("run", "--backend", "ebpf")
    assert result.returncode != 0
    assert "agent: --backend: 'ebpf' cannot run on this node: " in result.stderr
    bad = ferry.cli("run", "--backend", "pf")
    assert bad.returncode == 2 and "'pf' is not one of auto, iptables, nftables, ebpf" in bad.stderr
