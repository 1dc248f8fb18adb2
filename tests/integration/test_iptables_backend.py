"""The iptables backend against the real kernel, in throwaway network namespaces.

Each test gets fresh namespaces named `ferry-t<run>-<random>` (`tests.run_id`) (deleted in the
fixture's finalizer even when the test fails) and checks the kernel's own view:
`iptables-legacy-save`, `ip6tables-legacy-save`, `ip rule` and `ip route`. The traffic test sends
TCP only inside its own namespace, to an address routed to a veth pair whose both ends are there.
Needs root and iptables-legacy.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import RedirectionConfig
from agent.netns import NetnsExecutor, entered, open_netns
from agent.redirect.iptables import IptablesRedirection
from agent.redirect.rules import (
    FERRY_OUTPUT,
    Family,
    RedirectionError,
    desired_rules,
)
from tests.run_id import netns_name

pytestmark = pytest.mark.usefixtures("privileged")  # fails, never skips, without root

SO_ORIGINAL_DST = 80
SAVE = {4: "iptables-legacy-save", 6: "ip6tables-legacy-save"}
CFG = RedirectionConfig(
    exclude_outbound_ports=(22, 3306),
    exclude_inbound_ports=(9090,),
    exclude_outbound_cidrs=("10.96.0.0/12", "fd00:10:96::/112"),
)

MakeNetns = Callable[[], Path]


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


@pytest.fixture
def netns(make_netns: MakeNetns) -> Path:
    return make_netns()


@pytest.fixture(scope="module")
def executor() -> Iterator[NetnsExecutor]:
    pool = NetnsExecutor()
    yield pool
    pool.shutdown()


@pytest.fixture
def backend(executor: NetnsExecutor) -> IptablesRedirection:
    return IptablesRedirection(CFG, executor)


def save(netns: Path, family: Family = 4) -> dict[str, list[str]]:
    """iptables-legacy-save output by table, without comments and counters."""
    tables: dict[str, list[str]] = {}
    current: list[str] = []
    for line in in_netns(netns, SAVE[family]).splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        else:
            current.append(re.sub(r" \[\d+:\d+\]$", "", line))
    return tables


def rule_lines(netns: Path, family: Family = 4) -> list[str]:
    return [line for lines in save(netns, family).values() for line in lines]


def routing(netns: Path) -> str:
    return "\n".join(
        in_netns(netns, "ip", *args)
        for args in (
            ["-4", "rule"],
            ["-6", "rule"],
            ["-4", "route", "show", "table", "all"],
            ["-6", "route", "show", "table", "all"],
        )
    )


def fresh_like(make_netns: MakeNetns, netns: Path, family: Family) -> dict[str, list[str]]:
    """What a fresh netns saves once the same tables exist there (tables cannot be unloaded)."""
    reference = make_netns()
    names = Path(f"/proc/net/{'ip' if family == 4 else 'ip6'}_tables_names")
    tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    for table in in_netns(netns, "cat", str(names)).split():
        in_netns(reference, tool, "-t", table, "-S")
    return save(reference, family)


def desired_lines(family: Family) -> list[str]:
    return [r.line() for r in desired_rules(CFG).rules if r.family == family]


def test_apply_installs_rules_and_routing(backend: IptablesRedirection, netns: Path) -> None:
    assert backend.inspect(netns).state == "missing"
    assert not backend.installed(netns)
    backend.apply(netns)
    report = backend.inspect(netns)
    assert report.state == "ok", report
    assert backend.installed(netns)
    for family in (4, 6):
        installed = rule_lines(netns, family)
        for line in desired_lines(family):
            assert line in installed, f"{line!r} not in {SAVE[family]} output"
    assert "-A FERRY_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in rule_lines(netns, 4)
    assert (
        "-A FERRY_PREROUTING ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15006"
    ) in rule_lines(netns, 4)
    assert (
        "-A FERRY_PREROUTING ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff "
        "-j REDIRECT --to-ports 15006"
    ) in rule_lines(netns, 6)
    assert "-A FERRY_OUTPUT -d fd00:10:96::/112 -j RETURN" in rule_lines(netns, 6)
    assert "fwmark 0x111/0xfff lookup 100" in in_netns(netns, "ip", "-4", "rule")
    assert "fwmark 0x111/0xfff lookup 100" in in_netns(netns, "ip", "-6", "rule")
    assert "local default dev lo" in in_netns(netns, "ip", "-4", "route", "show", "table", "100")
    assert "local default dev lo" in in_netns(netns, "ip", "-6", "route", "show", "table", "100")


def test_apply_twice_is_identical(backend: IptablesRedirection, netns: Path) -> None:
    backend.apply(netns)
    first = (save(netns, 4), save(netns, 6), routing(netns))
    backend.apply(netns)
    assert (save(netns, 4), save(netns, 6), routing(netns)) == first
    assert backend.inspect(netns).state == "ok"


def test_flushed_chain_is_drift_and_apply_repairs(
    backend: IptablesRedirection, netns: Path
) -> None:
    backend.apply(netns)
    in_netns(netns, "iptables-legacy", "-t", "nat", "-F", FERRY_OUTPUT)
    report = backend.inspect(netns)
    assert report.state == "drifted"
    expected = tuple(r.command() for r in desired_rules(CFG).rules_of(4, "nat", FERRY_OUTPUT))
    assert report.missing == expected
    assert report.unexpected == ()
    backend.apply(netns)
    assert backend.inspect(netns).state == "ok"


def test_foreign_and_duplicate_jumps(backend: IptablesRedirection, netns: Path) -> None:
    in_netns(netns, "iptables-legacy", "-t", "nat", "-N", "OTHER")
    in_netns(netns, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "OTHER")
    in_netns(netns, "iptables-legacy", "-t", "nat", "-A", "OTHER", "-j", "RETURN")
    backend.apply(netns)
    in_netns(netns, "iptables-legacy", "-t", "nat", "-I", "OUTPUT", "-j", FERRY_OUTPUT)
    in_netns(netns, "iptables-legacy", "-t", "nat", "-I", "FERRY_OUTPUT", "-j", "ACCEPT")
    report = backend.inspect(netns)
    assert report.state == "drifted"
    assert set(report.unexpected) == {
        "iptables -t nat -A OUTPUT -j FERRY_OUTPUT",
        "iptables -t nat -A FERRY_OUTPUT -j ACCEPT",
    }
    backend.apply(netns)
    assert backend.inspect(netns).state == "ok"
    nat = save(netns, 4)["nat"]
    assert nat.count("-A OUTPUT -j FERRY_OUTPUT") == 1
    assert "-A OUTPUT -p udp -j OTHER" in nat and "-A OTHER -j RETURN" in nat
    backend.remove(netns)
    nat = save(netns, 4)["nat"]
    assert "-A OUTPUT -p udp -j OTHER" in nat and "-A OTHER -j RETURN" in nat
    assert not any("FERRY" in line for line in nat)


def test_remove_leaves_no_residue(
    backend: IptablesRedirection, netns: Path, make_netns: MakeNetns
) -> None:
    before = routing(netns)
    backend.apply(netns)
    backend.remove(netns)
    for family in (4, 6):
        assert save(netns, family) == fresh_like(make_netns, netns, family)
    assert routing(netns) == before
    assert "0x111" not in in_netns(netns, "ip", "-4", "rule")
    assert "0x111" not in in_netns(netns, "ip", "-6", "rule")
    for flag in ("-4", "-6"):
        shown = subprocess.run(
            ["ip", "-n", netns.name, flag, "route", "show", "table", "100"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert shown.stdout == ""
    assert backend.inspect(netns).state == "missing"
    assert not backend.installed(netns)
    backend.remove(netns)  # a second remove is fine too


def test_remove_never_applied(backend: IptablesRedirection, netns: Path) -> None:
    before = (in_netns(netns, SAVE[4]), in_netns(netns, SAVE[6]), routing(netns))
    backend.remove(netns)
    assert (in_netns(netns, SAVE[4]), in_netns(netns, SAVE[6]), routing(netns)) == before
    assert not backend.installed(netns)


def test_remove_partially_installed(backend: IptablesRedirection, netns: Path) -> None:
    backend.apply(netns)
    in_netns(netns, "iptables-legacy", "-t", "mangle", "-D", "OUTPUT", "-j", FERRY_OUTPUT)
    in_netns(netns, "iptables-legacy", "-t", "mangle", "-F", FERRY_OUTPUT)
    in_netns(netns, "iptables-legacy", "-t", "mangle", "-X", FERRY_OUTPUT)
    in_netns(netns, "ip", "-6", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")
    assert backend.inspect(netns).state == "drifted"
    backend.remove(netns)
    assert backend.inspect(netns).state == "missing"


def test_disabling_ipv6_removes_v6(executor: NetnsExecutor, netns: Path) -> None:
    IptablesRedirection(CFG, executor).apply(netns)
    v4_only = IptablesRedirection(replace(CFG, ipv6=False), executor)
    report = v4_only.inspect(netns)
    assert report.state == "drifted"
    assert report.unexpected and all(
        line.startswith(("ip6tables ", "ip -6 ")) for line in report.unexpected
    )
    v4_only.apply(netns)
    assert v4_only.inspect(netns).state == "ok"
    assert not any("FERRY" in line for line in rule_lines(netns, 6))
    assert "0x111" not in in_netns(netns, "ip", "-6", "rule")


def test_errors_name_netns_and_rule(executor: NetnsExecutor, make_netns: MakeNetns) -> None:
    netns = make_netns()
    run("ip", "-n", netns.name, "link", "set", "lo", "down")
    with pytest.raises(RedirectionError) as caught:
        IptablesRedirection(CFG, executor).apply(netns)
    assert str(netns) in str(caught.value)
    assert "ip -6 route add local ::/0 dev lo table 100" in str(caught.value)


def test_missing_netns_is_an_error(backend: IptablesRedirection) -> None:
    with pytest.raises(RedirectionError, match="ferry-t-does-not-exist"):
        backend.inspect(Path("/var/run/netns/ferry-t-does-not-exist"))


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(address), port


def test_real_traffic_is_redirected(backend: IptablesRedirection, netns: Path) -> None:
    # 192.0.2.1 is routed to a veth pair whose both ends stay inside the namespace (this kernel
    # has no dummy driver); nobody answers there, and nothing leaves the namespace.
    run(
        "ip",
        "-n",
        netns.name,
        "link",
        "add",
        "ferry-v0",
        "type",
        "veth",
        "peer",
        "name",
        "ferry-v1",
    )
    run("ip", "-n", netns.name, "addr", "add", "192.0.2.2/24", "dev", "ferry-v0")
    run("ip", "-n", netns.name, "link", "set", "ferry-v0", "up")
    run("ip", "-n", netns.name, "link", "set", "ferry-v1", "up")
    backend.apply(netns)
    fd = open_netns(netns)
    try:
        with entered(fd):
            listener = socket.create_server(("127.0.0.1", CFG.outbound_port))
            client = socket.socket()
            marked = socket.socket()
    finally:
        os.close(fd)
    with listener, client, marked:
        listener.settimeout(5)
        client.settimeout(5)
        client.connect(("192.0.2.1", 80))
        conn, _ = listener.accept()
        with conn:
            assert _original_dst(conn) == ("192.0.2.1", 80)
            assert conn.getpeername() == client.getsockname()

        # The proxy's own sockets carry the mark and go where they were sent (here: nowhere).
        marked.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, CFG.mark)
        marked.settimeout(0.5)
        with pytest.raises(TimeoutError):
            marked.connect(("192.0.2.1", 80))
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_an_ipv6_interface_match_with_a_partial_mask_is_drift(
    netns: Path, executor: NetnsExecutor
) -> None:
    """python-iptables sets a 0x01 mask on IPv6 interface names, so `-o lo` matched `veth0` too
    and IPv6 traffic left unredirected.  Rules left by such a version are reported as drift (and
    repaired by apply), and rules written now match only the named interface."""
    import iptc

    backend = IptablesRedirection(CFG, executor)
    backend.apply(netns)
    assert backend.inspect(netns).state == "ok"

    def plant() -> None:  # what Ferry's earlier version wrote: python-iptables' own mask
        table = iptc.Table6(iptc.Table6.NAT)
        table.autocommit = False
        rule = iptc.Rule6()
        rule.out_interface = "lo"
        rule.create_target("RETURN")
        iptc.Chain(table, FERRY_OUTPUT).insert_rule(rule)
        table.commit()
        table.refresh()

    executor.call(netns, plant)
    report = backend.inspect(netns)
    assert report.state == "drifted"
    assert any("-o lo?" in line for line in report.unexpected), report
    backend.apply(netns)
    assert backend.inspect(netns).state == "ok"
