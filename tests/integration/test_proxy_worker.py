"""A real worker process relaying real redirected traffic between two throwaway namespaces.

    client netns (10.77.0.1/30, veth0)  <--veth-->  server netns (10.77.0.2/30, veth0)

A namespace the test enrolls gets exactly the rules and routes production installs
(`IptablesRedirection.apply`): outbound TCP to 15001, inbound TCP to 15006, and the connmark +
policy-routing return path that lets the worker's transparent socket (bound to the client's IP)
receive the app's replies.  The worker is configured with the supervisor's typed messages.

Everything runs inside namespaces created here (names `ferry-t<run>-<random>`); they, their rules
and every process started are removed at the end, also when a test fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ProxyConfig, RedirectionConfig
from agent.netns import entered
from agent.proxy.messages import RemoveWorkload

from .netns_pair import (
    HTTP_PORT,
    NetnsPair,
    curl,
    needs_netns,
    request,
    serve_digest,
    sh,
    stats,
    wait_stats,
)

CLIENT_IP = "10.77.0.1"
SERVER_IP = "10.77.0.2"
CLIENT_IP6 = "fd00:77::1"
SERVER_IP6 = "fd00:77::2"

pytestmark = needs_netns


class Env(NetnsPair):
    """The client and server namespaces, their rules, and the processes started in them."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(
            tmp,
            ("c", "s"),
            (CLIENT_IP, SERVER_IP),
            RedirectionConfig(),
            ProxyConfig(connect_timeout=2.0, idle_timeout=30.0),
        )
        self.client, self.server = self.names
        self.client_fd, self.server_fd = self.netns_fds

    def ipt(self, ns: str, *rule: str) -> None:
        sh("ip", "netns", "exec", ns, "iptables-legacy", "-w", *rule)

    def worker(self, workloads: dict[str, int]) -> socket.socket:
        """Start a worker and give it the listeners of `workloads` (uid -> netns fd)."""
        ctl = self.start_worker("--worker-id", "7")
        for uid, netns_fd in workloads.items():
            self.add_workload(ctl, uid, netns_fd)
        return ctl


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Env(tmp_path) as e:
        yield e


def test_outbound_relay_keeps_client_ip_and_counts(env: Env) -> None:
    env.enroll(env.client)
    env.http_server()
    ctl = env.worker({"client": env.client_fd})
    out = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/peer", "-w",
               "\n%{size_request} %{size_header} %{size_download}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    body, sizes = out.stdout.rsplit("\n", 1)
    assert body == CLIENT_IP  # the upstream socket lives in the client netns
    request, header, download = map(int, sizes.split())
    s = wait_stats(ctl, lambda s: s.totals("client", "outbound")["connections_closed"] == 1)
    assert s.worker == 7 and s.active == 0
    assert s.totals("client", "outbound") == {
        "connections_opened": 1,
        "connections_closed": 1,
        "connect_failures": 0,
        "bytes_received": request,
        "bytes_sent": header + download,
    }
    assert s.totals("client", "inbound")["connections_opened"] == 0


def test_connect_failure_resets_client_fast(env: Env) -> None:
    env.enroll(env.client)
    ctl = env.worker({"client": env.client_fd})
    started = time.monotonic()
    out = curl(env.client, f"http://{SERVER_IP}:9/")  # nothing listens on 9
    assert out.returncode != 0
    assert time.monotonic() - started < 3
    s = wait_stats(ctl, lambda s: s.totals("client", "outbound")["connect_failures"] == 1)
    assert s.totals("client", "outbound")["connections_opened"] == 0
    assert s.active == 0


def test_connect_timeout_counts_failure(env: Env) -> None:
    env.enroll(env.client)
    # Drop SYNs to the server so that the worker's connect hangs until connect_timeout (2 s).
    env.ipt(env.server, "-A", "INPUT", "-p", "tcp", "--dport", "9999", "-j", "DROP")
    ctl = env.worker({"client": env.client_fd})
    started = time.monotonic()
    out = curl(env.client, f"http://{SERVER_IP}:9999/")
    elapsed = time.monotonic() - started
    assert out.returncode != 0
    assert 1.5 < elapsed < 5, elapsed
    wait_stats(ctl, lambda s: s.totals("client", "outbound")["connect_failures"] == 1)


def test_inbound_relay_shows_the_real_client_ip(env: Env) -> None:
    env.enroll(env.server)
    env.http_server()
    ctl = env.worker({"server": env.server_fd})
    out = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/peer")
    assert out.returncode == 0, out.stderr
    # Through the proxy, yet the app sees the client and not its own pod IP.
    assert out.stdout == CLIENT_IP
    s = wait_stats(ctl, lambda s: s.totals("server", "inbound")["connections_closed"] == 1)
    inbound = s.totals("server", "inbound")
    assert inbound["connections_opened"] == 1 and inbound["connect_failures"] == 0
    assert inbound["bytes_received"] > 0 and inbound["bytes_sent"] > len(CLIENT_IP)


def test_both_directions_and_del(env: Env) -> None:
    env.enroll(env.client)
    env.enroll(env.server)
    env.http_server()
    ctl = env.worker({"client": env.client_fd, "server": env.server_fd})
    out = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/big/3000000", "-o", "/dev/null",
               "-w", "%{size_download}")  # fmt: skip
    assert out.returncode == 0 and out.stdout == "3000000", out.stderr
    s = wait_stats(
        ctl,
        lambda s: (
            s.totals("client", "outbound")["connections_closed"] == 1
            and s.totals("server", "inbound")["connections_closed"] == 1
        ),
    )
    assert s.totals("client", "outbound")["bytes_sent"] > 3_000_000
    assert s.totals("server", "inbound")["bytes_sent"] > 3_000_000
    request(ctl, lambda seq: RemoveWorkload(seq, "server"))
    s = wait_stats(ctl, lambda s: "server" not in s.flows)
    assert "client" in s.flows
    # Nobody accepts on the server's inbound port now: the connection queues and times out.
    out = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/peer", "--max-time", "2")
    assert out.returncode != 0


def test_100mb_through_outbound_and_inbound(env: Env) -> None:
    """100 MiB client -> server and a digest back, via both proxies, with half-close."""
    env.enroll(env.client)
    env.enroll(env.server)
    ctl = env.worker({"client": env.client_fd, "server": env.server_fd})
    size = 100 * 1024 * 1024
    block = os.urandom(1 << 20)
    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    with entered(env.server_fd):
        srv = socket.create_server((SERVER_IP, 5001))
    thread, result = serve_digest(srv)
    try:
        with entered(env.client_fd):
            cli = socket.socket()
        with cli:
            cli.settimeout(60)
            cli.connect((SERVER_IP, 5001))
            started = time.monotonic()
            for _ in range(size // len(block)):
                cli.sendall(block)
            cli.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := cli.recv(1000):
                answer += chunk
            elapsed = time.monotonic() - started
    finally:
        thread.join(60)
        srv.close()
    assert answer.decode() == f"{size} {expected}"
    assert result["peer"] == CLIENT_IP
    print(f"100 MiB through two relays in {elapsed:.2f}s: {size * 8 / elapsed / 1e9:.1f} Gbit/s")
    s = wait_stats(ctl, lambda s: s.active == 0)
    for uid, direction in (("client", "outbound"), ("server", "inbound")):
        assert s.totals(uid, direction) == {
            "connections_opened": 1,
            "connections_closed": 1,
            "connect_failures": 0,
            "bytes_received": size,
            "bytes_sent": len(answer),
        }


def test_ipv6_outbound(env: Env) -> None:
    for ns, ip in ((env.client, CLIENT_IP6), (env.server, SERVER_IP6)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/126", "dev", "veth0", "nodad")
    env.enroll(env.client)
    ctl = env.worker({"client": env.client_fd})
    with entered(env.server_fd):
        srv = socket.create_server((SERVER_IP6, 5002), family=socket.AF_INET6)
    with srv:
        with entered(env.client_fd):
            cli = socket.socket(socket.AF_INET6)
        with cli:
            cli.settimeout(10)
            cli.connect((SERVER_IP6, 5002))
            srv.settimeout(10)
            conn, peer = srv.accept()
            with conn:
                conn.sendall(peer[0].encode())
            assert cli.recv(100).decode() == CLIENT_IP6
    s = wait_stats(ctl, lambda s: s.totals("client", "outbound")["connections_closed"] == 1)
    assert s.totals("client", "outbound")["bytes_sent"] == len(CLIENT_IP6)


def test_idle_timeout_closes_the_relay(env: Env) -> None:
    env.proxy = ProxyConfig(connect_timeout=2.0, idle_timeout=1.0)
    env.enroll(env.client)
    ctl = env.worker({"client": env.client_fd})
    with entered(env.server_fd):
        srv = socket.create_server((SERVER_IP, 5003))
    with srv:
        with entered(env.client_fd):
            cli = socket.socket()
        with cli:
            cli.settimeout(10)
            cli.connect((SERVER_IP, 5003))
            srv.settimeout(10)
            conn, _ = srv.accept()
            with conn:
                started = time.monotonic()
                assert cli.recv(1) == b""  # closed by the worker, not by either end
                assert 0.9 < time.monotonic() - started < 4
    wait_stats(ctl, lambda s: s.totals("client", "outbound")["connections_closed"] == 1)


def test_worker_exits_when_supervisor_goes_away(env: Env) -> None:
    ctl = env.worker({"client": env.client_fd})
    proc = env.procs[-1]
    stats(ctl)  # it is up
    ctl.close()
    assert proc.wait(5) == 0


@pytest.mark.parametrize(
    ("family", "address", "port"),
    [
        (socket.AF_INET, "127.0.0.1", 15001),
        (socket.AF_INET, "0.0.0.0", 15006),
        (socket.AF_INET, SERVER_IP, 15006),
        (socket.AF_INET, "0.0.0.0", 15008),
        (socket.AF_INET6, "::", 15006),
    ],
)
def test_no_process_in_the_pod_can_join_the_proxy_listeners(
    env: Env, family: int, address: str, port: int
) -> None:
    """A root process inside the pod binding Ferry's ports the way the proxy does (SO_REUSEPORT,
    SO_REUSEADDR) must fail: otherwise it would receive part of the redirected connections."""
    sh("ip", "-n", env.server, "addr", "add", f"{SERVER_IP6}/126", "dev", "veth0", "nodad")
    env.enroll(env.server)
    env.worker({"server": env.server_fd})
    with entered(env.server_fd):
        thief = socket.socket(family, socket.SOCK_STREAM)
    with thief:
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with pytest.raises(OSError) as refused:
            thief.bind((address, port))
        assert refused.value.errno == errno.EADDRINUSE
