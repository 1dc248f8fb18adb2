"""The in-pod redirection rules as plain data: what Ferry wants in a pod's netfilter tables.

`desired_rules(cfg)` is a pure function from a `RedirectionConfig` to a `RuleSet`; nothing here
touches the kernel.  Each `Rule` holds one iptables rule in the structured shape the kernel keeps
it in (address fields, match extensions, one target extension), plus a comment saying why the rule
exists.  Backends program the rules from that shape, read what the kernel holds back into the same
shape, and compare the two by their rendered lines, so "desired" and "observed" have exactly one
normalized form.

`render(ruleset, family)` writes Ferry's part of the tables in iptables-legacy-save style (no
counters, no timestamps, no builtin chain policies, which are not Ferry's; each rule is preceded by
a `#` comment, which iptables-restore ignores).  The rule lines are byte for byte
what `iptables-legacy-save` prints for the same rules, which the integration tests check, and the
golden files under tests/golden pin them.

The shape is Istio ambient's in-pod redirection:

- nat PREROUTING: inbound TCP, except to the tunnel port, excluded ports, loopback, from the
  proxy itself (its sockets carry `mark`) or from `PROBE_SOURCE` (the node's own connections,
  kubelet probes: `agent.redirect.probes`), is redirected to the inbound listener.
- nat OUTPUT: outbound TCP, except the proxy's own (`mark`), replies of connections the proxy
  delivered (`connmark`), loopback, excluded ports and excluded CIDRs, is redirected to the
  outbound listener.
- mangle: a connection the proxy opened towards the app (spoofing the client address with
  IP_TRANSPARENT) gets `connmark`; the app's reply packets have it restored as their mark, and the
  policy route in `agent.redirect.routing` sends them over lo back to the proxy.

Field conventions follow iptables: an address, interface or protocol starting with "!" is
negated, and `None` means "any".
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from agent.config import RedirectionConfig

Family = Literal[4, 6]
FAMILIES: tuple[Family, ...] = (4, 6)

CHAIN_PREFIX = "FERRY_"
"""Every chain whose name starts with this belongs to Ferry; no other chain is ever changed."""

TABLES = ("mangle", "nat")
"""The tables Ferry uses, in the order they are rendered."""

FERRY_PREROUTING = "FERRY_PREROUTING"
FERRY_OUTPUT = "FERRY_OUTPUT"

BUILTIN_ORDER = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
"""Builtin chains in the order iptables-save prints them."""

LOOPBACK = {4: "127.0.0.1/32", 6: "::1/128"}
PROBE_SOURCE = {4: "169.254.7.127/32", 6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128"}
"""The source the node's own connections to enrolled pods get (`agent.redirect.probes`), Istio
ambient's: an IPv4 link-local address and a ULA that no pod or remote peer is given."""
FULL_MASK = 0xFFFFFFFF


class RedirectionError(ValueError):
    """Programming or reading redirection failed; the message names the netns and the rule."""


@dataclass(frozen=True)
class Option:
    """One option of a match or target extension: `[!] --name value...`."""

    name: str
    values: tuple[str, ...] = ()
    negated: bool = False

    def render(self) -> str:
        words = ["!"] if self.negated else []
        words.append(f"--{self.name}")
        words.extend(self.values)
        return " ".join(words)


@dataclass(frozen=True)
class Extension:
    """A match (`-m name ...`) or a target (`-j NAME ...`) with its options in save order."""

    name: str
    options: tuple[Option, ...] = ()

    def render(self) -> str:
        return " ".join([self.name, *(o.render() for o in self.options)])


@dataclass(frozen=True)
class Rule:
    """One iptables rule in one family's table and chain.

    `comment` says why the rule exists; it is documentation, not part of the rule, so two rules
    that differ only in their comment are equal (rules read back from the kernel have none).
    """

    family: Family
    table: str
    chain: str
    target: Extension
    protocol: str | None = None
    source: str | None = None
    destination: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    matches: tuple[Extension, ...] = ()
    comment: str = field(default="", compare=False)

    def line(self) -> str:
        """The rule as iptables-save prints it: `-A CHAIN ... -j TARGET ...`."""
        words = ["-A", self.chain]
        for flag, value in (
            ("-s", self.source),
            ("-d", self.destination),
            ("-i", self.in_interface),
            ("-o", self.out_interface),
            ("-p", self.protocol),
        ):
            if value is not None:
                words.extend(_negatable(flag, value))
        for match in self.matches:
            words.extend(["-m", match.render()])
        words.extend(["-j", self.target.render()])
        return " ".join(words)

    def command(self) -> str:
        """A command line that adds the rule, for reports: `iptables -t nat -A ...`."""
        return f"{_tool(self.family)} -t {self.table} {self.line()}"


@dataclass(frozen=True)
class ChainRef:
    """A chain Ferry owns in one family's table."""

    family: Family
    table: str
    name: str

    def command(self) -> str:
        return f"{_tool(self.family)} -t {self.table} -N {self.name}"


@dataclass(frozen=True)
class RuleSet:
    """Ferry's chains and rules, in chain order: a desired state or one read from a kernel."""

    chains: tuple[ChainRef, ...] = ()
    rules: tuple[Rule, ...] = ()

    def tables(self, family: Family) -> tuple[str, ...]:
        used = {c.table for c in self.chains if c.family == family}
        used |= {r.table for r in self.rules if r.family == family}
        return tuple(t for t in TABLES if t in used) + tuple(sorted(used - set(TABLES)))

    def chains_of(self, family: Family, table: str) -> tuple[ChainRef, ...]:
        return tuple(c for c in self.chains if c.family == family and c.table == table)

    def rules_of(self, family: Family, table: str, chain: str | None = None) -> tuple[Rule, ...]:
        return tuple(
            r
            for r in self.rules
            if r.family == family and r.table == table and (chain is None or r.chain == chain)
        )

    def is_empty(self) -> bool:
        return not self.chains and not self.rules


def is_ferry_chain(name: str) -> bool:
    return name.startswith(CHAIN_PREFIX)


def format_mark(value: int, mask: int) -> str:
    """A mark as iptables prints it: `0x539/0xfff`, or just `0x539` under the full mask."""
    return f"{value:#x}" if mask == FULL_MASK else f"{value:#x}/{mask:#x}"


def _negatable(flag: str, value: str) -> list[str]:
    return ["!", flag, value[1:]] if value.startswith("!") else [flag, value]


def _tool(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _tcp_dport(port: int) -> tuple[Extension, ...]:
    return (Extension("tcp", (Option("dport", (str(port),)),)),)


def _redirect(port: int) -> Extension:
    return Extension("REDIRECT", (Option("to-ports", (str(port),)),))


RETURN = Extension("RETURN")


def _unique(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(values))


def excluded_cidrs(cfg: RedirectionConfig, family: Family) -> tuple[str, ...]:
    """The configured outbound CIDR exclusions of one family, normalized (`10.96.0.0/12`)."""
    networks = (ipaddress.ip_network(c, strict=False) for c in cfg.exclude_outbound_cidrs)
    return tuple(dict.fromkeys(str(n) for n in networks if n.version == family))


def _family_rules(cfg: RedirectionConfig, family: Family) -> tuple[list[ChainRef], list[Rule]]:
    mark = format_mark(cfg.mark, cfg.mark_mask)
    connmark = format_mark(cfg.connmark, cfg.mark_mask)
    mark_match = Extension("mark", (Option("mark", (mark,)),))
    chains: list[ChainRef] = []
    rules: list[Rule] = []

    def chain(table: str, name: str, builtin: str, why: str) -> None:
        chains.append(ChainRef(family, table, name))
        rules.append(Rule(family, table, builtin, Extension(name), comment=why))

    def rule(
        table: str,
        chain_name: str,
        target: Extension,
        why: str,
        *,
        protocol: str | None = None,
        source: str | None = None,
        destination: str | None = None,
        out_interface: str | None = None,
        matches: tuple[Extension, ...] = (),
    ) -> None:
        rules.append(
            Rule(
                family,
                table,
                chain_name,
                target,
                protocol=protocol,
                source=source,
                destination=destination,
                out_interface=out_interface,
                matches=matches,
                comment=why,
            )
        )

    # mangle: tag connections the proxy opened to the app, and route the app's replies back.
    chain("mangle", FERRY_PREROUTING, "PREROUTING", "send inbound packets through Ferry's chain")
    chain("mangle", FERRY_OUTPUT, "OUTPUT", "send outbound packets through Ferry's chain")
    rule(
        "mangle",
        FERRY_PREROUTING,
        Extension("CONNMARK", (Option("set-xmark", (connmark,)),)),
        "a connection the proxy delivers to the app (proxy mark) gets the connmark",
        matches=(mark_match,),
    )
    rule(
        "mangle",
        FERRY_OUTPUT,
        Extension(
            "CONNMARK",
            (
                Option("restore-mark"),
                Option("nfmask", (f"{FULL_MASK:#x}",)),
                Option("ctmask", (f"{FULL_MASK:#x}",)),
            ),
        ),
        "the app's replies on a connmarked connection get the connmark as their mark, so the "
        "policy route sends them back to the proxy over lo",
        matches=(Extension("connmark", (Option("mark", (connmark,)),)),),
    )

    # nat PREROUTING: inbound TCP to the inbound listener.
    chain("nat", FERRY_PREROUTING, "PREROUTING", "send inbound packets through Ferry's chain")
    rule(
        "nat",
        FERRY_PREROUTING,
        RETURN,
        "the tunnel listener receives its traffic directly",
        protocol="tcp",
        matches=_tcp_dport(cfg.tunnel_port),
    )
    rule(
        "nat",
        FERRY_PREROUTING,
        RETURN,
        "the node's own connections (kubelet probes) arrive from this address (SNAT on the node, "
        "agent.redirect.probes) and reach the app directly",
        protocol="tcp",
        source=PROBE_SOURCE[family],
    )
    for port in _unique(cfg.exclude_inbound_ports):
        rule(
            "nat",
            FERRY_PREROUTING,
            RETURN,
            f"inbound port {port} is excluded by configuration",
            protocol="tcp",
            matches=_tcp_dport(port),
        )
    rule(
        "nat",
        FERRY_PREROUTING,
        _redirect(cfg.inbound_port),
        "all other inbound TCP, unless to loopback or from the proxy, goes to the inbound listener",
        protocol="tcp",
        destination="!" + LOOPBACK[family],
        matches=(Extension("mark", (Option("mark", (mark,), negated=True),)),),
    )

    # nat OUTPUT: outbound TCP to the outbound listener.
    chain("nat", FERRY_OUTPUT, "OUTPUT", "send outbound packets through Ferry's chain")
    rule(
        "nat",
        FERRY_OUTPUT,
        RETURN,
        "the proxy's own sockets carry the mark and are never redirected",
        matches=(mark_match,),
    )
    rule(
        "nat",
        FERRY_OUTPUT,
        RETURN,
        "replies on connections the proxy delivered go back to the proxy, not to the listener",
        protocol="tcp",
        matches=(Extension("connmark", (Option("mark", (connmark,)),)),),
    )
    rule(
        "nat",
        FERRY_OUTPUT,
        RETURN,
        "loopback traffic, including the pod calling its own IP, stays in the pod",
        out_interface="lo",
    )
    for port in _unique(cfg.exclude_outbound_ports):
        rule(
            "nat",
            FERRY_OUTPUT,
            RETURN,
            f"outbound port {port} is excluded by configuration",
            protocol="tcp",
            matches=_tcp_dport(port),
        )
    for cidr in excluded_cidrs(cfg, family):
        rule(
            "nat",
            FERRY_OUTPUT,
            RETURN,
            f"destination {cidr} is excluded by configuration",
            destination=cidr,
        )
    rule(
        "nat",
        FERRY_OUTPUT,
        _redirect(cfg.outbound_port),
        "all other outbound TCP goes to the outbound listener",
        protocol="tcp",
    )
    return chains, rules


def desired_rules(cfg: RedirectionConfig) -> RuleSet:
    """Ferry's chains and rules for `cfg`: IPv4 always, IPv6 when `cfg.ipv6`."""
    chains: list[ChainRef] = []
    rules: list[Rule] = []
    for family in FAMILIES:
        if family == 6 and not cfg.ipv6:
            continue
        family_chains, family_rules = _family_rules(cfg, family)
        chains.extend(family_chains)
        rules.extend(family_rules)
    return RuleSet(tuple(chains), tuple(rules))


def _chain_order(rule: Rule) -> tuple[int, str]:
    """iptables-save order: builtin chains in hook order, then user chains by name."""
    if rule.chain in BUILTIN_ORDER:
        return (BUILTIN_ORDER.index(rule.chain), "")
    return (len(BUILTIN_ORDER), rule.chain)


def render(ruleset: RuleSet, family: Family) -> str:
    """Ferry's part of `family`'s tables in iptables-legacy-save style, with `#` comments."""
    out: list[str] = []
    for table in ruleset.tables(family):
        out.append(f"*{table}")
        out.extend(f":{c.name} -" for c in sorted(ruleset.chains_of(family, table), key=_name))
        for rule in sorted(ruleset.rules_of(family, table), key=_chain_order):
            if rule.comment:
                out.append(f"# {rule.comment}")
            out.append(rule.line())
        out.append("COMMIT")
    return "".join(f"{line}\n" for line in out)


def _name(chain: ChainRef) -> str:
    return chain.name


def ruleset_commands(ruleset: RuleSet) -> tuple[str, ...]:
    """Every chain and rule as a command line, grouped by family, table and chain in save order."""
    lines: list[str] = []
    for family in FAMILIES:
        for table in ruleset.tables(family):
            lines.extend(c.command() for c in sorted(ruleset.chains_of(family, table), key=_name))
            rules = sorted(ruleset.rules_of(family, table), key=_chain_order)
            lines.extend(r.command() for r in rules)
    return tuple(lines)


def diff_lines(
    desired: Iterable[str], actual: Iterable[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Lines only in `desired` (missing) and only in `actual` (unexpected), order-aware.

    Both inputs are in a canonical order (`ruleset_commands`), so a rule that sits in the wrong
    place within its chain shows up as both missing (where it belongs) and unexpected (where it is).
    """
    want, have = list(desired), list(actual)
    missing: list[str] = []
    unexpected: list[str] = []
    matcher = difflib.SequenceMatcher(a=want, b=have, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("replace", "delete"):
            missing.extend(want[i1:i2])
        if tag in ("replace", "insert"):
            unexpected.extend(have[j1:j2])
    return tuple(missing), tuple(unexpected)


@dataclass(frozen=True)
class RedirectionReport:
    """What a backend found in one netns compared with what it wants there.

    `state` is "ok" (exactly as desired), "missing" (nothing of Ferry's is installed) or
    "drifted" (something is, but it differs).  `missing` and `unexpected` are command lines
    (`iptables -t nat -A ...`, `ip -4 rule add ...`) for what should be there and is not, and
    what is there and should not be.
    """

    state: Literal["ok", "drifted", "missing"]
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


def compare(desired: Iterable[str], actual: Iterable[str]) -> RedirectionReport:
    """The report for desired versus observed command lines (see `ruleset_commands`)."""
    actual = tuple(actual)
    missing, unexpected = diff_lines(desired, actual)
    if not actual:
        return RedirectionReport("missing", missing, ())
    if missing or unexpected:
        return RedirectionReport("drifted", missing, unexpected)
    return RedirectionReport("ok")
