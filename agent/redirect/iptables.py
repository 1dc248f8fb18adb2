"""The iptables (legacy, through python-iptables) redirection backend.

`IptablesRedirection` programs the rules of `agent.redirect.rules.desired_rules` and the routing
of `agent.redirect.routing.desired_routing` inside a pod's network namespace, reads them back,
and removes them.  Every method takes the namespace's path and does its work on the
`NetnsExecutor`'s thread, which enters the namespace for the duration of the call; the caller's
thread never moves.

How a table is changed.  libiptc (under python-iptables) takes a snapshot of a whole table, edits
it in memory and replaces the table in one `setsockopt` on commit, so each table changes
atomically: a packet sees either the old rules or the new ones.  Per table we:

1. flush every existing Ferry chain (names starting with `FERRY_`),
2. create the desired Ferry chains that are missing,
3. in every other chain, keep exactly the desired jumps to Ferry chains and delete the others
   (rules that do not jump to a Ferry chain are never touched),
4. delete Ferry chains that are no longer desired, append the desired rules, and commit once.

If the table already holds exactly the desired state, nothing is written, so the periodic
reconcile does not rewrite every pod's tables.  Tables of the other family, or IPv6 with
`ipv6: false`, are reconciled to "nothing of Ferry's", which is also what `remove` does.

python-iptables specifics, all confined to this module:

- `iptc.Table(name)` objects are cached per name for the whole process, and a libiptc handle
  belongs to the namespace it was created in.  So every use takes the module lock (the cache is
  shared by all threads), sets `autocommit=False` before `refresh()` (a refresh with autocommit
  would first commit the stale handle), and refreshes after entering the namespace.
- Reading a table that the namespace has never used would instantiate it, so reads and removals
  first check /proc/thread-self/net/ip{,6}_tables_names and treat an absent table as empty.
- Rules are read back with `get_all_parameters()` of each match and target, which parses the
  extension's own save output; that is why a rule read back renders exactly as iptables-save
  prints it, and why desired and observed rules compare as rendered lines.
- libxtables registers a family-specific extension (REDIRECT) for one family per process;
  `_prepare_extensions` loads it once per family before first use, see there.
- python-iptables captures an extension's save output by briefly pointing fd 1 at a pipe; the
  lock keeps two such reads from overlapping.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import iptc

from agent.config import RedirectionConfig
from agent.netns import NetnsExecutor
from agent.redirect.routing import (
    apply_routing,
    desired_routing,
    read_routing,
    remove_routing,
)
from agent.redirect.rules import (
    FAMILIES,
    TABLES,
    ChainRef,
    Extension,
    Family,
    Option,
    RedirectionError,
    RedirectionReport,
    Rule,
    RuleSet,
    compare,
    desired_rules,
    is_ferry_chain,
    ruleset_commands,
)

T = TypeVar("T")

_IPTC_LOCK = threading.Lock()
_FAMILY_SPECIFIC_EXTENSIONS = ("libxt_NAT.so",)  # REDIRECT, for IPv4 and IPv6
_extension_copies: list[ctypes.CDLL] = []  # keeps the private copies loaded
_extensions_ready = False
_TABLE_NAMES = {
    4: "/proc/thread-self/net/ip_tables_names",
    6: "/proc/thread-self/net/ip6_tables_names",
}
_ANY_PROTOCOL = {"ip", "all", "0", "ipv6"}


class IptablesRedirection:
    """In-pod redirection with iptables-legacy rules and policy routing."""

    name = "iptables"

    def __init__(self, cfg: RedirectionConfig, executor: NetnsExecutor) -> None:
        self.cfg = cfg
        self.executor = executor
        self.rules = desired_rules(cfg)
        self.routing = desired_routing(cfg)

    def apply(self, netns: Path) -> None:
        """Install or repair Ferry's rules and routing in `netns`; idempotent."""

        def inside() -> None:
            for family in FAMILIES:
                for table in TABLES:
                    _apply_table(self.rules, family, table)
            apply_routing(self.cfg)

        self._call(netns, inside)

    def inspect(self, netns: Path) -> RedirectionReport:
        """Compare what the kernel holds in `netns` with the desired rules and routing."""
        rules, routing = self._call(netns, lambda: (_read_all(), read_routing(self.cfg)))
        desired = ruleset_commands(self.rules) + self.routing.commands()
        return compare(desired, ruleset_commands(rules) + routing.commands())

    def remove(self, netns: Path) -> None:
        """Delete Ferry's chains, jumps and routing from `netns`; fine if none are there."""

        def inside() -> None:
            _remove_chains()
            remove_routing(self.cfg)

        self._call(netns, inside)

    def installed(self, netns: Path) -> bool:
        """Whether anything of Ferry's (a chain, a jump or a route) is present in `netns`."""
        return self.inspect(netns).state != "missing"

    def own_rules(self, netns: Path) -> tuple[str, ...]:
        """Ferry's chains and jumps in `netns` as command lines (not the routing: it is shared
        with the other backends)."""
        return ruleset_commands(self._call(netns, _read_all))

    def remove_own_rules(self, netns: Path) -> None:
        """Delete Ferry's chains and jumps from `netns`, leaving the routing."""
        self._call(netns, _remove_chains)

    def _call(self, netns: Path, fn: Callable[[], T]) -> T:
        try:
            return self.executor.call(netns, fn)
        except RedirectionError as exc:
            raise RedirectionError(f"netns {netns}: {exc}") from exc
        except OSError as exc:
            raise RedirectionError(f"netns {netns}: cannot enter: {exc.strerror}") from exc


def apply_ruleset(desired: RuleSet, tables: tuple[str, ...]) -> None:
    """Make Ferry's part of `tables` (both families) in the calling thread's netns equal
    `desired`; for the node's own chain (`agent.redirect.probes`)."""
    for family in FAMILIES:
        for table in tables:
            _apply_table(desired, family, table)


def _remove_chains() -> None:
    for family in FAMILIES:
        for table in TABLES:
            _apply_table(RuleSet(), family, table)


def _prepare_extensions() -> None:
    """Register libxtables' family-specific extensions for both IPv4 and IPv6, once per process.

    An iptables extension library registers itself from its ELF constructor, and libxtables keeps
    only the entries for the family that is current at that moment; a library is constructed once
    per process, and a later lookup of the other family fails (and is then remembered as "no such
    target").  REDIRECT (in libxt_NAT.so) is such an extension.  Loading a private in-memory copy
    of the library once per family, with that family current, runs its constructor twice and
    registers both.  This must happen before any lookup; if the library is already mapped (someone
    else in this process used it first), we leave libxtables alone rather than risk registering an
    extension twice, which libxtables punishes with exit(1).
    """
    global _extensions_ready
    if _extensions_ready:
        return
    _extensions_ready = True
    libdir = iptc.xtables._xtables_libdir
    with open("/proc/self/maps") as maps:
        mapped = maps.read()
    for library in _FAMILY_SPECIFIC_EXTENSIONS:
        path = os.path.realpath(os.path.join(libdir, library))
        if not os.path.exists(path) or path in mapped:
            continue
        with open(path, "rb") as image:
            code = image.read()
        fds = []
        try:
            for proto in (iptc.xtables.NFPROTO_IPV4, iptc.xtables.NFPROTO_IPV6):
                fd = os.memfd_create(f"ferry-{library}-{proto}", os.MFD_CLOEXEC)
                fds.append(fd)  # kept open until all copies load: each needs its own path
                os.write(fd, code)
                iptc.xtables.xtables._xtables_set_nfproto(proto)
                _extension_copies.append(ctypes.CDLL(f"/proc/self/fd/{fd}"))
        finally:
            for fd in fds:
                os.close(fd)


def _loaded_tables(family: Family) -> set[str]:
    try:
        with open(_TABLE_NAMES[family]) as names:
            return set(names.read().split())
    except FileNotFoundError:
        return set()


def _open_table(family: Family, name: str) -> Any:
    """The process-wide python-iptables table object, refreshed in the current netns."""
    _prepare_extensions()
    table = (iptc.Table if family == 4 else iptc.Table6)(name, autocommit=False)
    table.autocommit = False
    _iptc(family, name, f"open table {name}", table.refresh)
    return table


def _iptc(family: Family, table: str, what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except RedirectionError:
        raise
    except (iptc.IPTCError, iptc.XTablesError, ValueError, AttributeError) as exc:
        tool = "iptables" if family == 4 else "ip6tables"
        raise RedirectionError(f"{tool} -t {table}: {what} failed: {exc}") from exc


def _read_all() -> RuleSet:
    chains: list[ChainRef] = []
    rules: list[Rule] = []
    with _IPTC_LOCK:
        for family in FAMILIES:
            loaded = _loaded_tables(family)
            for name in TABLES:
                if name in loaded:
                    table_chains, table_rules = _read_table(_open_table(family, name), family)
                    chains.extend(table_chains)
                    rules.extend(table_rules)
    return RuleSet(tuple(chains), tuple(rules))


def _read_table(table: Any, family: Family) -> tuple[list[ChainRef], list[Rule]]:
    def read() -> tuple[list[ChainRef], list[Rule]]:
        chains: list[ChainRef] = []
        rules: list[Rule] = []
        for chain in table.chains:
            if is_ferry_chain(chain.name):
                chains.append(ChainRef(family, table.name, chain.name))
                rules.extend(_from_iptc(family, table.name, chain.name, r) for r in chain.rules)
            else:
                rules.extend(
                    _from_iptc(family, table.name, chain.name, r)
                    for r in chain.rules
                    if is_ferry_chain(r.target.name)
                )
        return chains, rules

    return _iptc(family, table.name, "read", read)


def _apply_table(desired: RuleSet, family: Family, name: str) -> None:
    """Make Ferry's part of one table equal `desired`'s in one commit (none if it already is)."""
    want_chains = desired.chains_of(family, name)
    want_rules = desired.rules_of(family, name)
    with _IPTC_LOCK:
        if name not in _loaded_tables(family) and not want_chains and not want_rules:
            return
        table = _open_table(family, name)
        have_chains, have_rules = _read_table(table, family)
        want = RuleSet(want_chains, want_rules)
        if ruleset_commands(RuleSet(tuple(have_chains), tuple(have_rules))) == ruleset_commands(
            want
        ):
            return
        wanted_names = {c.name for c in want_chains}
        existing = [c.name for c in have_chains]

        for chain_name in existing:
            _iptc(family, name, f"-F {chain_name}", partial(table.flush_entries, chain_name))
        for chain in want_chains:
            if chain.name not in existing:
                _iptc(family, name, chain.command(), partial(table.create_chain, chain.name))
        _reconcile_jumps(table, family, want_rules)
        for chain_name in existing:
            if chain_name not in wanted_names:
                _iptc(family, name, f"-X {chain_name}", partial(table.delete_chain, chain_name))
        for rule in want_rules:
            if is_ferry_chain(rule.chain):
                _append(table, rule)
        _iptc(family, name, "commit", table.commit)


def _reconcile_jumps(table: Any, family: Family, want_rules: tuple[Rule, ...]) -> None:
    """In every non-Ferry chain keep exactly the desired jumps into Ferry's chains."""
    chains = _iptc(family, table.name, "list chains", lambda: list(table.chains))
    for chain in chains:
        if is_ferry_chain(chain.name):
            continue
        wanted = [r for r in want_rules if r.chain == chain.name]
        for entry in _iptc(
            family, table.name, f"-S {chain.name}", partial(getattr, chain, "rules")
        ):
            if not is_ferry_chain(entry.target.name):
                continue
            seen = _from_iptc(family, table.name, chain.name, entry)
            if seen in wanted:
                wanted.remove(seen)
            else:
                _iptc(
                    family,
                    table.name,
                    seen.command().replace(" -A ", " -D ", 1),
                    partial(chain.delete_rule, entry),
                )
        for rule in wanted:
            _append(table, rule)


def _append(table: Any, rule: Rule) -> None:
    def append() -> None:
        chain = iptc.Chain(table, rule.chain)
        chain.append_rule(_to_iptc(rule))

    _iptc(rule.family, rule.table, rule.command(), append)


def _to_iptc(rule: Rule) -> Any:
    entry = iptc.Rule() if rule.family == 4 else iptc.Rule6()
    if rule.protocol is not None:
        entry.protocol = rule.protocol
    if rule.source is not None:
        entry.src = rule.source
    if rule.destination is not None:
        entry.dst = rule.destination
    if rule.in_interface is not None:
        entry.in_interface = rule.in_interface
    if rule.out_interface is not None:
        entry.out_interface = rule.out_interface
    if rule.family == 6:
        _fix_interface_masks(entry)
    for match in rule.matches:
        _set_options(entry.create_match(match.name), match)
    _set_options(entry.create_target(rule.target.name), rule.target)
    return entry


def _set_options(extension: Any, spec: Extension) -> None:
    for option in spec.options:
        extension.parse(
            option.name, ["!", *option.values] if option.negated else list(option.values)
        )


def _from_iptc(family: Family, table: str, chain: str, entry: Any) -> Rule:
    return Rule(
        family,
        table,
        chain,
        target=Extension(entry.target.name, _options(entry.target.get_all_parameters())),
        protocol=_protocol(entry.protocol),
        source=_address(entry.src),
        destination=_address(entry.dst),
        in_interface=_interface(family, entry, "in"),
        out_interface=_interface(family, entry, "out"),
        matches=tuple(Extension(m.name, _options(m.get_all_parameters())) for m in entry.matches),
    )


def _fix_interface_masks(entry: Any) -> None:
    """python-iptables (1.0.1) gives an IPv6 rule's interface a mask of 0x01 per character
    instead of 0xff, so the kernel compares only the lowest bit of each byte: `-o lo` then also
    matches `veth0` or `net1`, and IPv6 traffic leaving through them escapes the proxy.  Set the
    mask the way ip6tables does (0xff over the name and its NUL, 0 for a `+` wildcard's rest)."""
    ipv6 = entry.entry.ipv6
    for field in ("iniface_mask", "outiface_mask"):
        length = bytes(getattr(ipv6, field)).count(1)  # name (+ NUL), or a `+` prefix
        if length:
            setattr(ipv6, field, b"\xff" * length)


def _interface(family: Family, entry: Any, which: str) -> str | None:
    """The rule's interface as iptables-save shows it; an IPv6 mask that is not all ones over
    the name is shown as a difference (`lo?`), so drift repair replaces such a rule."""
    name = entry.in_interface if which == "in" else entry.out_interface
    if not name or family != 6:
        return name or None
    mask = bytes(getattr(entry.entry.ipv6, f"{which}iface_mask"))
    length = len(name.lstrip("!").rstrip("+")) + (0 if name.endswith("+") else 1)
    return name if mask[:length] == b"\xff" * length else f"{name}?"


def _options(params: dict[str, list[str]]) -> tuple[Option, ...]:
    options = []
    for name, values in params.items():
        negated = bool(values) and values[0] == "!"
        options.append(Option(name, tuple(values[1:] if negated else values), negated))
    return tuple(options)


def _protocol(value: str | None) -> str | None:
    if value is None or value.lstrip("!") in _ANY_PROTOCOL:
        return None
    return value


def _address(value: str | None) -> str | None:
    """`!127.0.0.1/255.255.255.255` as iptables-save prints it (`!127.0.0.1/32`); any is None."""
    if value is None:
        return None
    negated = value.startswith("!")
    bare = value.lstrip("!")
    try:
        network = ipaddress.ip_network(bare, strict=False)
    except ValueError:
        return value
    if network.prefixlen == 0 and not negated:
        return None
    return ("!" if negated else "") + str(network)
