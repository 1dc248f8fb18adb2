"""Which redirection backend `redirection.backend: auto` picks on a node, and why (pure).

`choose_backend(host)` decides from plain data, `HostRules`: what the commands an operator would
type print in the agent's own network namespace (`iptables-legacy-save` and
`ip6tables-legacy-save`, `nft list ruleset`), and whether the eBPF and nftables backends can run
here (each with its reason).  `agent.redirect.select` gathers that; the tests feed recorded
outputs from files (tests/data/detect/).

The rule, in order:

1. eBPF when the kernel and headers allow it: it needs no netfilter rules at all.
2. iptables when the host has legacy rules (an `-A` line in the legacy save output): "existing
   legacy rules mean legacy", as Istio decides (tools/istio-iptables, `DetectIptablesVersion`):
   the node's other software (kube-proxy, a CNI, a firewall) programs legacy tables, and a host
   that mixes legacy and nft rules is the one to avoid.
3. nftables when the host's rules are nft (a rule in `nft list ruleset`, which also shows what
   iptables-nft programs, Debian's default `iptables`) and the nftables backend can run.
4. Otherwise iptables: a host with no rules at all gives no hint, and iptables is the backend
   every kernel Ferry supports has.

Both counts go into the reason, so `agent status` shows what the decision was made on.  Reading
the rules changes nothing (the legacy save lists only the tables the kernel already has), so
detecting again after a restart sees the same host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.redirect.nft_rules import listing_commands

BackendName = Literal["iptables", "nftables", "ebpf"]


@dataclass(frozen=True)
class HostRules:
    """What detection looks at, as recorded on the host."""

    legacy_save: str  # iptables-legacy-save, then ip6tables-legacy-save
    nft_ruleset: str  # nft list ruleset
    ebpf: tuple[bool, str]  # usable, and why (not)
    nftables: tuple[bool, str]  # usable, and why (not)


@dataclass(frozen=True)
class Choice:
    backend: BackendName
    reason: str


def legacy_rule_count(save_output: str) -> int:
    """Rules in `iptables-legacy-save` output (its `-A` lines)."""
    return sum(1 for line in save_output.splitlines() if line.startswith("-A "))


def nft_counts(ruleset: str) -> tuple[int, int]:
    """(rules, tables) in `nft list ruleset` output."""
    lines = listing_commands(ruleset)
    rules = sum(1 for line in lines if line.startswith("nft add rule "))
    tables = sum(1 for line in lines if line.startswith("nft add table ") and "{" not in line)
    return rules, tables


def choose_backend(host: HostRules) -> Choice:
    """The backend `auto` picks for `host`, with the reason (see the module docstring)."""
    ebpf_ok, ebpf_why = host.ebpf
    if ebpf_ok:
        return Choice("ebpf", f"auto: eBPF is available ({ebpf_why})")
    legacy = legacy_rule_count(host.legacy_save)
    nft_rules, nft_tables = nft_counts(host.nft_ruleset)
    seen = (
        f"iptables-legacy-save: {legacy} rule(s); nft list ruleset: {nft_rules} rule(s) in "
        f"{nft_tables} table(s); eBPF: {ebpf_why}"
    )
    if legacy:
        return Choice("iptables", f"auto: the host has legacy iptables rules ({seen})")
    if nft_rules:
        nft_ok, nft_why = host.nftables
        if nft_ok:
            return Choice("nftables", f"auto: the host's rules are nft ({seen})")
        return Choice(
            "iptables", f"auto: the host's rules are nft, but nftables is unusable: {nft_why} "
            f"({seen})"
        )  # fmt: skip
    return Choice("iptables", f"auto: the host has no rules, iptables is the default ({seen})")
