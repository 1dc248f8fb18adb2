"""The nftables backend against the real kernel, in throwaway network namespaces.

What the kernel holds is checked with the `nft` and `ip` commands an operator would use: the
table listed back is exactly the rendered (golden) one, a second apply writes nothing, drift
(a flushed ruleset, a deleted table, a flushed chain, a foreign rule) is reported in nft's words
and repaired, and removal leaves the namespace as it was.  Needs root and nftables.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import RedirectionConfig
from agent.netns import NetnsExecutor
from agent.redirect.nft_rules import commands, nft_table, render
from agent.redirect.nftables import NftablesRedirection
from agent.redirect.rules import RedirectionError, desired_rules
from tests.integration.pod_netns import (
    MakeNetns,
    executor,
    in_netns,
    make_netns,
    nft_ruleset,
    routing,
    run,
)
from tests.unit.test_nft_rules import CASES

pytestmark = pytest.mark.usefixtures("privileged")  # fails, never skips, without root
__all__ = ["executor", "make_netns"]  # fixtures

CFG = CASES["exclusions"]


@pytest.fixture
def netns(make_netns: MakeNetns) -> Path:
    return make_netns()


@pytest.fixture
def backend(executor: NetnsExecutor) -> NftablesRedirection:
    return NftablesRedirection(CFG, executor)


def listed(netns: Path) -> str:
    return in_netns(netns, "nft", "list", "table", "inet", "ferry")


def uncommented(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if not line.strip().startswith("#"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_kernel_lists_exactly_the_rendered_table(
    case: str, executor: NetnsExecutor, netns: Path
) -> None:
    backend = NftablesRedirection(CASES[case], executor)
    assert backend.inspect(netns).state == "missing"
    backend.apply(netns)
    assert listed(netns) == uncommented(render(nft_table(desired_rules(CASES[case]))))
    report = backend.inspect(netns)
    assert report.state == "ok", report
    assert backend.installed(netns)
    assert "fwmark 0x111" in in_netns(netns, "ip", "-4", "rule")


def test_apply_twice_writes_nothing(backend: NftablesRedirection, netns: Path) -> None:
    backend.apply(netns)
    first = (in_netns(netns, "nft", "-a", "list", "ruleset"), routing(netns))
    backend.apply(netns)  # a rewrite would give the table and its rules new handles
    assert (in_netns(netns, "nft", "-a", "list", "ruleset"), routing(netns)) == first


@pytest.mark.parametrize(
    "vandalism",
    [
        ["flush", "ruleset"],
        ["delete", "table", "inet", "ferry"],
        ["flush", "chain", "inet", "ferry", "nat_output"],
        ["insert", "rule", "inet", "ferry", "nat_output", "tcp", "dport", "80", "accept"],
    ],
    ids=["flush-ruleset", "delete-table", "flush-chain", "foreign-rule"],
)
def test_drift_is_reported_and_repaired(
    backend: NftablesRedirection, netns: Path, vandalism: list[str]
) -> None:
    backend.apply(netns)
    good = listed(netns)
    in_netns(netns, "nft", *vandalism)
    report = backend.inspect(netns)
    assert report.state == "drifted"
    wanted = commands(nft_table(desired_rules(CFG)))
    if vandalism[0] == "insert":
        assert report.missing == ()
        assert report.unexpected == ("nft add rule inet ferry nat_output tcp dport 80 accept",)
    elif vandalism[0] == "flush" and vandalism[1] == "chain":
        assert report.missing == tuple(c for c in wanted if " rule inet ferry nat_output " in c)
    else:
        assert report.missing == wanted
    backend.apply(netns)
    assert listed(netns) == good
    assert backend.inspect(netns).state == "ok"


def test_remove_leaves_no_residue_and_other_tables_alone(
    backend: NftablesRedirection, netns: Path
) -> None:
    before = routing(netns)
    in_netns(netns, "nft", "add", "table", "inet", "someone")
    in_netns(netns, "nft", "add", "chain", "inet", "someone", "input")
    others = nft_ruleset(netns)
    backend.apply(netns)
    backend.remove(netns)
    assert nft_ruleset(netns) == others
    assert routing(netns) == before
    assert backend.inspect(netns).state == "missing"
    assert not backend.installed(netns)
    backend.remove(netns)  # a second remove is fine too
    assert nft_ruleset(netns) == others


def test_disabling_ipv6_is_drift_and_apply_narrows_the_table(
    executor: NetnsExecutor, netns: Path
) -> None:
    NftablesRedirection(CFG, executor).apply(netns)
    v4_only = NftablesRedirection(replace(CFG, ipv6=False), executor)
    report = v4_only.inspect(netns)
    assert report.state == "drifted"
    assert any(line.startswith("ip -6 ") for line in report.unexpected)
    v4_only.apply(netns)
    assert v4_only.inspect(netns).state == "ok"
    assert "ip6 daddr" not in listed(netns)
    assert "0x111" not in in_netns(netns, "ip", "-6", "rule")


def test_errors_name_netns_and_what_failed(executor: NetnsExecutor, netns: Path) -> None:
    run("ip", "-n", netns.name, "link", "set", "lo", "down")
    with pytest.raises(RedirectionError) as caught:
        NftablesRedirection(RedirectionConfig(), executor).apply(netns)
    assert str(netns) in str(caught.value)
    assert "ip -6 route add local ::/0 dev lo table 100" in str(caught.value)
    with pytest.raises(RedirectionError, match="ferry-t-does-not-exist"):
        NftablesRedirection(CFG, executor).inspect(Path("/var/run/netns/ferry-t-does-not-exist"))
