"""Every backend steers real traffic the same way; switching backends leaves nothing behind.

Two throwaway namespaces joined by a veth pair (`pod_netns.Wire`): the pod, with Ferry's
redirection, and a client.  Outbound, the pod's connections reach the outbound listener with
their original destination (IPv4 and IPv6), an excluded port and the proxy's marked sockets
pass; inbound, the client's connections reach the inbound listener, the tunnel port does not.
Then the pod switches from iptables to nftables and back, and from iptables to eBPF and back
(`select.make_backend`, as the agent builds it), with traffic checked and the other backend's
rules gone after each switch.  And `auto` is run inside namespaces holding legacy, iptables-nft
and no rules.  eBPF pins its objects under a state dir per test, removed after it; its object
is compiled once per session (FERRY_BPF_CACHE_DIR, tests/conftest.py).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ConfigError, RedirectionConfig
from agent.netns import NetnsExecutor
from agent.proxy.sockets import original_dst as proxy_original_dst
from agent.redirect import ebpf, ebpf_listeners, select
from agent.redirect.backend import SoleRedirection
from agent.redirect.detect import Choice, choose_backend
from agent.redirect.select import host_rules, make_backend, select_backend
from tests.integration.pod_netns import (
    MakeNetns,
    Wire,
    executor,
    ferry_iptables,
    in_netns,
    make_netns,
    nft_ruleset,
    original_dst,
    routing,
    sockets_in,
)

pytestmark = pytest.mark.usefixtures("privileged")  # fails, never skips, without root
__all__ = ["executor", "make_netns"]  # fixtures

CFG = RedirectionConfig(exclude_outbound_ports=(22,))
BACKENDS = ("iptables", "nftables", "ebpf")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir; the eBPF backend's pins under it (and their bpffs) are removed after."""
    yield tmp_path
    ebpf.cleanup(tmp_path)


def backend_for(name: str, executor: NetnsExecutor, state_dir: Path) -> SoleRedirection:
    return make_backend(Choice(name, "test"), CFG, executor, state_dir)  # type: ignore[arg-type]


def outbound_is_redirected(wire: Wire) -> None:
    """The pod's connections to the client end up at the outbound listener, with the original
    destination; port 22 (excluded) and marked sockets go out untouched."""

    def make() -> list[socket.socket]:
        return [
            socket.create_server(("127.0.0.1", CFG.outbound_port)),
            socket.create_server(("::1", CFG.outbound_port), family=socket.AF_INET6),
            socket.socket(),
            socket.socket(socket.AF_INET6),
            socket.socket(),
            socket.socket(),
        ]

    v4, v6, client4, client6, excluded, marked = sockets_in(wire.pod, make)
    with v4, v6, client4, client6, excluded, marked:
        for listener, client, ip in ((v4, client4, wire.client_ip[0]),
                                     (v6, client6, wire.client_ip[1])):  # fmt: skip
            listener.settimeout(5)
            client.settimeout(5)
            client.connect((ip, 8080))
            conn, _ = listener.accept()
            with conn:
                assert original_dst(conn) == (ip, 8080)
        marked.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, CFG.mark)
        for sock, port in ((excluded, 22), (marked, 8080)):
            sock.settimeout(2)
            with pytest.raises(ConnectionRefusedError):  # the client namespace answers: RST
                sock.connect((wire.client_ip[0], port))


def inbound_is_redirected(wire: Wire, state_dir: Path) -> None:
    """The client's connections to the pod reach the inbound listener; the tunnel port does
    not (nothing listens on it here, so the connection is refused).  The listener is registered
    the way the proxy does it (for eBPF's sk_lookup; nothing for the others)."""
    (listener,) = sockets_in(wire.pod, lambda: [socket.create_server(("", CFG.inbound_port))])
    client, tunnel = sockets_in(wire.client, lambda: [socket.socket(), socket.socket()])
    with listener, client, tunnel:
        ebpf_listeners.register(state_dir, [listener])
        listener.settimeout(5)
        client.settimeout(5)
        client.connect((wire.pod_ip[0], 8080))
        conn, peer = listener.accept()
        with conn:
            assert peer[0] == wire.client_ip[0]
            assert proxy_original_dst(conn) == (wire.pod_ip[0], 8080)
        tunnel.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            tunnel.connect((wire.pod_ip[0], CFG.tunnel_port))


@pytest.mark.parametrize("name", BACKENDS)
def test_real_traffic_is_redirected(
    name: str, executor: NetnsExecutor, make_netns: MakeNetns, state_dir: Path
) -> None:
    wire = Wire.make(make_netns)
    backend = backend_for(name, executor, state_dir)
    backend.apply(wire.pod)
    assert backend.inspect(wire.pod).state == "ok"
    outbound_is_redirected(wire)
    inbound_is_redirected(wire, state_dir)
    backend.remove(wire.pod)
    assert not backend.installed(wire.pod)


def test_switching_backends_migrates_without_residue(
    executor: NetnsExecutor, make_netns: MakeNetns, state_dir: Path
) -> None:
    wire = Wire.make(make_netns)
    before = (routing(wire.pod), nft_ruleset(wire.pod))
    iptables = backend_for("iptables", executor, state_dir)
    nftables = backend_for("nftables", executor, state_dir)
    iptables.apply(wire.pod)
    report = nftables.inspect(wire.pod)  # what an agent restarted with nftables sees first
    assert report.state == "drifted"
    assert "iptables -t nat -A FERRY_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in (
        report.unexpected
    )
    nftables.apply(wire.pod)
    assert nftables.inspect(wire.pod).state == "ok"
    assert ferry_iptables(wire.pod) == []
    outbound_is_redirected(wire)
    inbound_is_redirected(wire, state_dir)

    report = iptables.inspect(wire.pod)  # and back
    assert report.state == "drifted"
    assert "nft add table inet ferry" in report.unexpected
    iptables.apply(wire.pod)
    assert iptables.inspect(wire.pod).state == "ok"
    assert nft_ruleset(wire.pod) == before[1]
    outbound_is_redirected(wire)
    inbound_is_redirected(wire, state_dir)

    nftables.apply(wire.pod)  # an unenroll under either removes both
    iptables.apply(wire.pod)
    nftables.remove(wire.pod)
    assert (routing(wire.pod), nft_ruleset(wire.pod)) == before
    assert ferry_iptables(wire.pod) == []
    assert not iptables.installed(wire.pod) and not nftables.installed(wire.pod)


def test_switching_to_ebpf_and_back_leaves_nothing(
    executor: NetnsExecutor, make_netns: MakeNetns, state_dir: Path
) -> None:
    wire = Wire.make(make_netns)
    before = routing(wire.pod)
    iptables = backend_for("iptables", executor, state_dir)
    iptables.apply(wire.pod)
    bpf = backend_for("ebpf", executor, state_dir)
    assert "iptables -t nat -A FERRY_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in (
        bpf.inspect(wire.pod).unexpected
    )
    bpf.apply(wire.pod)
    assert bpf.inspect(wire.pod).state == "ok"
    assert ferry_iptables(wire.pod) == []
    outbound_is_redirected(wire)
    inbound_is_redirected(wire, state_dir)

    iptables = backend_for("iptables", executor, state_dir)  # an agent restarted with iptables
    report = iptables.inspect(wire.pod)
    assert report.state == "drifted"
    assert any(line.startswith("bpf sk_lookup") for line in report.unexpected), report
    iptables.apply(wire.pod)
    assert iptables.inspect(wire.pod).state == "ok"
    assert not bpf.selected.installed(wire.pod)
    outbound_is_redirected(wire)
    inbound_is_redirected(wire, state_dir)

    iptables.remove(wire.pod)
    assert routing(wire.pod) == before
    assert ferry_iptables(wire.pod) == []
    assert not bpf.installed(wire.pod)


def test_auto_reads_the_rules_of_its_own_namespace(
    executor: NetnsExecutor, make_netns: MakeNetns, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert select_backend(RedirectionConfig(backend="auto")).backend == "ebpf"  # this kernel
    monkeypatch.setattr(select, "ebpf_support", lambda: (False, "test: no eBPF"))
    auto = RedirectionConfig(backend="auto")
    empty, nft, legacy = make_netns(), make_netns(), make_netns()
    in_netns(nft, "iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    in_netns(legacy, "iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    chosen = {
        netns: executor.call(netns, lambda: select_backend(auto)) for netns in (empty, nft, legacy)
    }
    assert chosen[empty].backend == "iptables" and "no rules" in chosen[empty].reason
    assert chosen[nft].backend == "nftables" and "1 rule(s) in 1 table(s)" in chosen[nft].reason
    assert chosen[legacy].backend == "iptables"
    assert "iptables-legacy-save: 1 rule(s)" in chosen[legacy].reason
    assert choose_backend(executor.call(legacy, host_rules)) == chosen[legacy]


def test_a_backend_that_cannot_run_is_refused_with_why(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "headers" in select_backend(RedirectionConfig(backend="ebpf")).reason
    monkeypatch.setattr(select, "ebpf_support", lambda: (False, "no kernel headers"))
    with pytest.raises(ConfigError, match="'ebpf' cannot run on this node: no kernel headers"):
        select_backend(RedirectionConfig(backend="ebpf"), origin="--backend")
    assert select_backend(RedirectionConfig(backend="nftables")) == Choice(
        "nftables", "redirection.backend is nftables"
    )
