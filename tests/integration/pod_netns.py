"""Throwaway pod namespaces for the redirection backend tests, and what they look like inside.

`make_netns` (a fixture) makes fresh namespaces named by `tests.run_id` and deletes them after
the test, also when it fails; `executor` is one netns thread per test module.  `Wire` joins a
client namespace to a pod namespace with a veth pair (192.0.2.0/24 and 2001:db8::/64, both ends
in namespaces the test made), so traffic never leaves them.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.netns import NetnsExecutor, entered, open_netns
from tests.run_id import netns_name

MakeNetns = Callable[[], Path]
SO_ORIGINAL_DST = 80  # SOL_IP and SOL_IPV6 (IP6T_SO_ORIGINAL_DST) alike
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def in_netns(netns: Path, *args: str) -> str:
    return run("ip", "netns", "exec", netns.name, *args)


@pytest.fixture
def make_netns() -> Iterator[MakeNetns]:
    created: list[str] = []

    def make() -> Path:
        name = netns_name()
        run("ip", "netns", "add", name)
        created.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return Path("/var/run/netns") / name

    yield make
    for name in created:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="module")
def executor() -> Iterator[NetnsExecutor]:
    pool = NetnsExecutor()
    yield pool
    pool.shutdown()


def ferry_iptables(netns: Path) -> list[str]:
    """Every line of Ferry's in the legacy tables of both families."""
    return [
        line for family in (4, 6) for line in in_netns(netns, SAVE[family]).splitlines()
        if "FERRY" in line
    ]  # fmt: skip


def nft_ruleset(netns: Path) -> str:
    return in_netns(netns, "nft", "list", "ruleset")


def routing(netns: Path) -> str:
    return "\n".join(
        in_netns(netns, "ip", *args)
        for args in (["-4", "rule"], ["-6", "rule"], ["-4", "route", "show", "table", "all"],
                     ["-6", "route", "show", "table", "all"])
    )  # fmt: skip


def original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, address = struct.unpack("!2xH4s8x", raw)
        return socket.inet_ntoa(address), port
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port, address = struct.unpack("!2xH4x16s4x", raw)
    return socket.inet_ntop(socket.AF_INET6, address), port


def sockets_in(netns: Path, make: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    """Sockets made inside `netns` (they stay there for their whole life)."""
    fd = open_netns(netns)
    try:
        with entered(fd):
            return make()
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Wire:
    """A client namespace and a pod namespace joined by a veth pair."""

    client: Path
    pod: Path
    client_ip: tuple[str, str] = ("192.0.2.1", "2001:db8::1")
    pod_ip: tuple[str, str] = ("192.0.2.2", "2001:db8::2")

    @classmethod
    def make(cls, make_netns: MakeNetns) -> Wire:
        wire = cls(make_netns(), make_netns())
        run("ip", "-n", wire.client.name, "link", "add", "ferry-c", "type", "veth", "peer",
            "name", "ferry-p", "netns", wire.pod.name)  # fmt: skip
        for netns, dev, index in ((wire.client, "ferry-c", 0), (wire.pod, "ferry-p", 1)):
            ips = (wire.client_ip, wire.pod_ip)[index]
            run("ip", "-n", netns.name, "addr", "add", f"{ips[0]}/24", "dev", dev)
            run("ip", "-n", netns.name, "addr", "add", f"{ips[1]}/64", "dev", dev, "nodad")
            # no link-local address: the kernel would add it (and its route) a moment after
            # the link comes up, and a test comparing routing before and after would race it
            run("ip", "-n", netns.name, "link", "set", dev, "addrgenmode", "none", "up")
        return wire
