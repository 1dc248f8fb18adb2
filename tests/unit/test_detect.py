"""`redirection.backend: auto` as a table over recorded host outputs.

Each case under tests/data/detect/ is what `iptables-legacy-save; ip6tables-legacy-save`
(`<case>.legacy`, timestamps elided) and `nft list ruleset` (`<case>.nft`) printed in a network
namespace set up like such a host: kube-proxy-style legacy rules, the same through iptables-nft
(Debian's default `iptables`), a native nft firewall, both at once, and tables with no rules.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.redirect.detect import HostRules, choose_backend, legacy_rule_count, nft_counts

DATA = Path(__file__).resolve().parent.parent / "data" / "detect"
NO_EBPF = (False, "eBPF backend not built yet")
NFT_OK = (True, "libnftables answers")


def host(case: str, ebpf: tuple[bool, str] = NO_EBPF, nft: tuple[bool, str] = NFT_OK) -> HostRules:
    return HostRules(
        (DATA / f"{case}.legacy").read_text(), (DATA / f"{case}.nft").read_text(), ebpf, nft
    )


@pytest.mark.parametrize(
    ("case", "backend", "because"),
    [
        ("empty", "iptables", "the host has no rules, iptables is the default"),
        ("legacy", "iptables", "the host has legacy iptables rules"),
        ("iptables_nft", "nftables", "the host's rules are nft"),
        ("native_nft", "nftables", "the host's rules are nft"),
        ("mixed", "iptables", "the host has legacy iptables rules"),
        ("tables_without_rules", "iptables", "the host has no rules"),
    ],
)
def test_auto_chooses_by_the_host_rules(case: str, backend: str, because: str) -> None:
    choice = choose_backend(host(case))
    assert choice.backend == backend
    assert choice.reason.startswith(f"auto: {because}")


@pytest.mark.parametrize(
    ("case", "legacy", "nft_rules", "nft_tables"),
    [
        ("empty", 0, 0, 0),
        ("legacy", 5, 0, 0),
        ("iptables_nft", 0, 3, 2),
        ("native_nft", 0, 2, 1),
        ("mixed", 1, 2, 1),
        ("tables_without_rules", 0, 0, 1),
    ],
)
def test_counts_are_in_the_reason(case: str, legacy: int, nft_rules: int, nft_tables: int) -> None:
    recorded = host(case)
    assert legacy_rule_count(recorded.legacy_save) == legacy
    assert nft_counts(recorded.nft_ruleset) == (nft_rules, nft_tables)
    assert (
        f"iptables-legacy-save: {legacy} rule(s); nft list ruleset: {nft_rules} rule(s) in "
        f"{nft_tables} table(s)"
    ) in choose_backend(recorded).reason


def test_ebpf_wins_when_available() -> None:
    choice = choose_backend(host("legacy", ebpf=(True, "bcc compiles, cgroup v2 at /sys/fs/x")))
    assert choice.backend == "ebpf"
    assert choice.reason == "auto: eBPF is available (bcc compiles, cgroup v2 at /sys/fs/x)"


def test_nft_host_without_usable_nftables_falls_back_to_iptables() -> None:
    why = "the nftables Python bindings do not import"
    choice = choose_backend(host("native_nft", nft=(False, why)))
    assert choice.backend == "iptables"
    assert f"nftables is unusable: {why}" in choice.reason
