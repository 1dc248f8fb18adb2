"""Ferry's redirection as one nftables table: the rules of `agent.redirect.rules`, for nft.

There is one desired state.  `agent.redirect.rules.desired_rules` computes it as iptables rules
(chains and rules per family and table); `nft_table` translates that same data into one
`table inet ferry`, so both backends steer exactly the same traffic.  Nothing here touches the
kernel.

The translation:

- Each jump from a builtin chain into a Ferry chain (`-A OUTPUT -j FERRY_OUTPUT` in `nat`)
  becomes a base chain named `<table>_<hook>` (`nat_output`) holding that Ferry chain's rules,
  at the priority the iptables table has (mangle -150, nat -100), so a packet meets the same
  rules at the same point.  mangle OUTPUT is a `route` chain: like iptables' mangle OUTPUT, it
  routes a packet again when a rule changed its mark, which the return-path policy route needs.
  `RETURN` in a base chain ends that chain only, as in the iptables Ferry chain; other tables'
  chains on the same hook still run, as the builtin chain's other rules did.
- The IPv4 and IPv6 rule lists of a chain are merged: a rule both families have (most) appears
  once, a rule of one family only (loopback and excluded addresses) appears with its `ip daddr`
  or `ip6 daddr` match, which only that family's packets can match, and a one-family rule
  without an address match gets `meta nfproto ipv4|ipv6` (all of them when `ipv6: false`).
- Matches and targets map one to one: `-p tcp` to `meta l4proto tcp` (left out when `tcp dport`
  follows, which implies it), `-d` to `ip daddr`/`ip6 daddr`, `-o` to `oifname`, `-m mark` to
  `meta mark & mask`, `-m connmark` to `ct mark & mask`, `REDIRECT` to `redirect to :port`,
  `CONNMARK --set-xmark v/m` to `ct mark set ct mark & (~m | v) | v` and `CONNMARK
  --restore-mark` (full masks) to `meta mark set ct mark`.  Anything else raises
  `RedirectionError` naming the rule.

Every statement is built twice from the same values: as libnftables JSON, which the backend
submits (`transaction`: add, delete and add the table again, then its chains and rules, in one
atomic transaction; `removal`: add and delete it), and as the text `nft list table inet ferry`
prints for it, byte for byte (the integration tests check this against the kernel; the golden
files under tests/golden pin it).  Desired and observed state are compared as command lines
(`nft add rule inet ferry nat_output oifname "lo" return`): `commands` makes them from the
desired table and `listing_commands` from what nft lists, for any table and any rule, so drift
shows up in nft's own words.
"""

from __future__ import annotations

import difflib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from agent.redirect.rules import (
    BUILTIN_ORDER,
    FULL_MASK,
    TABLES,
    Extension,
    Family,
    Option,
    RedirectionError,
    Rule,
    RuleSet,
    is_ferry_chain,
)

FAMILY = "inet"
TABLE = "ferry"
TABLE_REF = f"{FAMILY} {TABLE}"

PRIORITY = {"mangle": -150, "nat": -100}
"""The priority of the iptables table each base chain stands for (NF_IP_PRI_MANGLE, _NAT_DST)."""

Json = dict[str, Any]


@dataclass(frozen=True)
class Statement:
    """One nft statement (a match or an action): its text as nft lists it, and its JSON.

    `family` is set when the statement only matches packets of one family (`ip daddr ...`)."""

    text: str
    json: Json = field(compare=False)
    family: Family | None = field(default=None, compare=False)


@dataclass(frozen=True)
class NftChain:
    """A base chain of the table: `type nat hook output priority -100; policy accept;`."""

    name: str
    type: str
    hook: str
    priority: int

    def header(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self._priority()}; policy accept;"

    def _priority(self) -> str:
        """nft's name for the priority where it has one for this hook, else the number."""
        if self.priority == PRIORITY["mangle"]:
            return "mangle"
        if self.priority == PRIORITY["nat"] and self.hook == "prerouting":
            return "dstnat"
        return str(self.priority)

    def command(self) -> str:
        return f"nft add chain {TABLE_REF} {self.name} {{ {self.header()} }}"

    def json(self) -> Json:
        return {
            "family": FAMILY,
            "table": TABLE,
            "name": self.name,
            "type": self.type,
            "hook": self.hook,
            "prio": self.priority,
            "policy": "accept",
        }


@dataclass(frozen=True)
class NftRule:
    """One rule of a chain; `comment` says why it exists (documentation, not compared)."""

    chain: str
    statements: tuple[Statement, ...]
    comment: str = field(default="", compare=False)

    def line(self) -> str:
        return " ".join(s.text for s in self.statements)

    def command(self) -> str:
        return f"nft add rule {TABLE_REF} {self.chain} {self.line()}"

    def json(self) -> Json:
        return {
            "family": FAMILY,
            "table": TABLE,
            "chain": self.chain,
            "expr": [s.json for s in self.statements],
        }

    def bound_to(self, family: Family) -> NftRule:
        """This rule, matching only `family`'s packets."""
        if any(s.family == family for s in self.statements):
            return self
        nfproto = _match(_meta("nfproto"), "==", f"ipv{family}", f"ipv{family}")
        return NftRule(self.chain, (nfproto, *self.statements), self.comment)


@dataclass(frozen=True)
class NftTable:
    """Ferry's `table inet ferry`: base chains in order, and their rules in chain order."""

    chains: tuple[NftChain, ...] = ()
    rules: tuple[NftRule, ...] = ()

    def rules_of(self, chain: str) -> tuple[NftRule, ...]:
        return tuple(r for r in self.rules if r.chain == chain)


# --- statements ----------------------------------------------------------------------------------


def _meta(key: str) -> tuple[str, Json]:
    return f"meta {key}", {"meta": {"key": key}}


def _ct(key: str) -> tuple[str, Json]:
    return f"ct {key}", {"ct": {"key": key}}


def _match(
    left: tuple[str, Json],
    op: str,
    right_text: str,
    right_json: Any,
    *,
    masked: bool = False,
    family: Family | None = None,
) -> Statement:
    """`left right`, `left != right`; nft writes `==` only after a mask (`meta mark & m == v`)."""
    words = [left[0], op] if op == "!=" or masked else [left[0]]
    return Statement(
        " ".join([*words, right_text]),
        {"match": {"op": op, "left": left[1], "right": right_json}},
        family,
    )


def _mark(key: str, option: Option) -> Statement:
    """`-m mark --mark v/m` and `-m connmark --mark v/m` as `meta mark & m == v`, `ct mark ...`."""
    value, mask = _mark_value(option)
    left = _meta("mark") if key == "meta" else _ct("mark")
    op = "!=" if option.negated else "=="
    if mask == FULL_MASK:
        return _match(left, op, f"{value:#010x}", value)
    masked = (f"{left[0]} & {mask:#010x}", {"&": [left[1], mask]})
    return _match(masked, op, f"{value:#010x}", value, masked=True)


def _mark_value(option: Option) -> tuple[int, int]:
    text = option.values[0] if len(option.values) == 1 else ""
    value, _, mask = text.partition("/")
    try:
        return int(value, 16), int(mask or f"{FULL_MASK:#x}", 16)
    except ValueError:
        raise RedirectionError(f"mark {text!r} is not value[/mask] in hex") from None


def _address(family: Family, field_name: str, value: str) -> Statement:
    negated = value.startswith("!")
    network = ipaddress.ip_network(value.lstrip("!"), strict=False)
    if network.version != family:
        raise RedirectionError(f"address {value!r} in an IPv{family} rule")
    protocol = "ip" if family == 4 else "ip6"
    address = str(network.network_address)
    text = address  # a host address is written bare
    right: Any = address
    if network.prefixlen != network.max_prefixlen:
        text = f"{address}/{network.prefixlen}"
        right = {"prefix": {"addr": address, "len": network.prefixlen}}
    left = (f"{protocol} {field_name}", {"payload": {"protocol": protocol, "field": field_name}})
    return _match(left, "!=" if negated else "==", text, right, family=family)


def _negatable(key: str, value: str) -> Statement:
    """`-o lo` as `oifname "lo"`, `-p tcp` as `meta l4proto tcp` (with `!=` when negated); nft
    writes interface names quoted and without `meta`."""
    bare = value.lstrip("!")
    op = "!=" if value.startswith("!") else "=="
    if key == "l4proto":
        return _match(_meta(key), op, bare, bare)
    return _match((key, _meta(key)[1]), op, f'"{bare}"', bare)


def _option(extension: Extension, name: str) -> Option | None:
    return next((o for o in extension.options if o.name == name), None)


def _extension_match(rule: Rule, match: Extension) -> Statement:
    option = match.options[0] if len(match.options) == 1 else None
    if match.name == "tcp" and option is not None and option.name == "dport":
        port = int(option.values[0])
        left = ("tcp dport", {"payload": {"protocol": "tcp", "field": "dport"}})
        return _match(left, "!=" if option.negated else "==", str(port), port)
    if match.name in ("mark", "connmark") and option is not None and option.name == "mark":
        return _mark("meta" if match.name == "mark" else "ct", option)
    raise RedirectionError(f"the nftables backend has no translation for `-m {match.render()}` "
                           f"in `{rule.command()}`")  # fmt: skip


def _target(rule: Rule) -> Statement:
    target = rule.target
    if target.name == "RETURN" and not target.options:
        return Statement("return", {"return": None})
    to_ports = _option(target, "to-ports")
    if target.name == "REDIRECT" and to_ports is not None and len(target.options) == 1:
        port = int(to_ports.values[0])
        return Statement(f"redirect to :{port}", {"redirect": {"port": port}})
    set_xmark = _option(target, "set-xmark")
    if target.name == "CONNMARK" and set_xmark is not None and len(target.options) == 1:
        value, mask = _mark_value(set_xmark)
        ct_mark = _ct("mark")
        if mask == FULL_MASK:
            return Statement(f"ct mark set {value:#010x}", _set(ct_mark, value))
        keep = (~mask & FULL_MASK) | value  # how nft states (ct mark & ~m) ^ v with v inside m
        return Statement(
            f"ct mark set ct mark & {keep:#010x} | {value:#010x}",
            _set(ct_mark, {"|": [{"&": [ct_mark[1], keep]}, value]}),
        )
    full = (f"{FULL_MASK:#x}",)
    restore = (Option("restore-mark"), Option("nfmask", full), Option("ctmask", full))
    if target.name == "CONNMARK" and target.options == restore:
        return Statement("meta mark set ct mark", _set(_meta("mark"), _ct("mark")[1]))
    raise RedirectionError(f"the nftables backend has no translation for `-j {target.render()}` "
                           f"in `{rule.command()}`")  # fmt: skip


def _set(key: tuple[str, Json], value: Any) -> Json:
    return {"mangle": {"key": key[1], "value": value}}


def _statements(rule: Rule) -> tuple[Statement, ...]:
    """One iptables rule's matches and target, as nft statements in iptables-save order."""
    out: list[Statement] = []
    if rule.source is not None:
        out.append(_address(rule.family, "saddr", rule.source))
    if rule.destination is not None:
        out.append(_address(rule.family, "daddr", rule.destination))
    if rule.in_interface is not None:
        out.append(_negatable("iifname", rule.in_interface))
    if rule.out_interface is not None:
        out.append(_negatable("oifname", rule.out_interface))
    implied = any(m.name == rule.protocol for m in rule.matches)  # `tcp dport` implies tcp
    if rule.protocol is not None and not implied:
        out.append(_negatable("l4proto", rule.protocol))
    out.extend(_extension_match(rule, m) for m in rule.matches)
    out.append(_target(rule))
    return tuple(out)


# --- the table -----------------------------------------------------------------------------------


def _chain_type(table: str, hook: str) -> str:
    if table == "nat":
        return "nat"
    return "route" if hook == "output" else "filter"


def _merge(v4: list[NftRule], v6: list[NftRule]) -> list[NftRule]:
    """One chain's IPv4 and IPv6 rules as one list: common rules once, the others bound to their
    family, each family's rules in their own order."""
    matcher = difflib.SequenceMatcher(
        a=[r.line() for r in v4], b=[r.line() for r in v6], autojunk=False
    )
    merged: list[NftRule] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            merged.extend(v4[i1:i2])
        else:
            merged.extend(r.bound_to(4) for r in v4[i1:i2])
            merged.extend(r.bound_to(6) for r in v6[j1:j2])
    return merged


def nft_table(ruleset: RuleSet) -> NftTable:
    """`ruleset` (`agent.redirect.rules.desired_rules`) as one `table inet ferry`."""
    chains: list[NftChain] = []
    rules: list[NftRule] = []
    for table in TABLES:
        for builtin in BUILTIN_ORDER:
            hook = builtin.lower()
            name = f"{table}_{hook}"
            per_family: dict[Family, list[NftRule]] = {4: [], 6: []}
            hooked = False
            for family, found in per_family.items():
                for jump in ruleset.rules_of(family, table, builtin):
                    if jump != Rule(family, table, builtin, Extension(jump.target.name)) or (
                        not is_ferry_chain(jump.target.name)
                    ):
                        raise RedirectionError(
                            "the nftables backend only hooks plain jumps into Ferry's chains, "
                            f"not `{jump.command()}`"
                        )
                    hooked = True
                    found.extend(
                        NftRule(name, _statements(r), r.comment)
                        for r in ruleset.rules_of(family, table, jump.target.name)
                    )
            if hooked:
                chains.append(NftChain(name, _chain_type(table, hook), hook, PRIORITY[table]))
                rules.extend(_merge(per_family[4], per_family[6]))
    return NftTable(tuple(chains), tuple(rules))


# --- rendering -----------------------------------------------------------------------------------


def render(table: NftTable) -> str:
    """The table as `nft list table inet ferry` prints it, each rule after a `#` comment saying
    why (nft -f reads this text too)."""
    out = [f"table {TABLE_REF} {{"]
    for index, chain in enumerate(table.chains):
        if index:
            out.append("")
        out.append(f"\tchain {chain.name} {{")
        out.append(f"\t\t{chain.header()}")
        for rule in table.rules_of(chain.name):
            if rule.comment:
                out.append(f"\t\t# {rule.comment}")
            out.append(f"\t\t{rule.line()}")
        out.append("\t}")
    out.append("}")
    return "".join(f"{line}\n" for line in out)


def commands(table: NftTable) -> tuple[str, ...]:
    """The table, its chains and rules as nft command lines, in listing order."""
    lines = [f"nft add table {TABLE_REF}"]
    for chain in table.chains:
        lines.append(chain.command())
        lines.extend(rule.command() for rule in table.rules_of(chain.name))
    return tuple(lines)


def _table_json() -> Json:
    return {"table": {"family": FAMILY, "name": TABLE}}


def transaction(table: NftTable) -> Json:
    """One libnftables JSON batch that replaces whatever `table inet ferry` holds with `table`.

    Adding the table first makes the delete succeed when there is none; the kernel applies the
    whole batch at once or not at all."""
    batch: list[Json] = [{"add": _table_json()}, {"delete": _table_json()}, {"add": _table_json()}]
    batch.extend({"add": {"chain": chain.json()}} for chain in table.chains)
    batch.extend({"add": {"rule": rule.json()}} for rule in table.rules)
    return {"nftables": batch}


def removal() -> Json:
    """One libnftables JSON batch that deletes `table inet ferry`, there or not."""
    return {"nftables": [{"add": _table_json()}, {"delete": _table_json()}]}


def listing_commands(listing: str) -> tuple[str, ...]:
    """`nft list table ...` / `nft list ruleset` text as nft command lines, in listing order.

    Tables, chains (with their `type ... hook ...` header, if any) and rules become
    `nft add table|chain|rule` lines; any other object in a table (a set, a map, ...) becomes one
    `nft add <kind> <table> <name> { ... }` line with its body joined by `; `."""
    lines: list[str] = []
    table = ""
    chain = ""  # inside a chain: its name; its command is written at its first line
    header_pending = False
    other: list[str] = []  # inside another object: its opening words, then its body
    depth = 0
    for raw in listing.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line == "}":
            depth -= 1
            if chain and depth == 1:
                if header_pending:
                    lines.append(f"nft add chain {table} {chain}")
                chain, header_pending = "", False
            elif other and depth == 1:
                kind, name = other[0], other[1]
                lines.append(f"nft add {kind} {table} {name} {{ {'; '.join(other[2:])} }}")
                other = []
            elif other:
                other.append("}")
            continue
        if line.endswith("{") and depth == 0:
            table = " ".join(line[:-1].split()[1:])
            lines.append(f"nft add table {table}")
            depth = 1
        elif line.endswith("{") and depth == 1:
            words = line[:-1].split()
            if words[0] == "chain":
                chain, header_pending = words[1], True
            else:
                other = words[:2]
            depth = 2
        elif chain and header_pending:
            header_pending = False
            if line.startswith("type "):
                lines.append(f"nft add chain {table} {chain} {{ {line} }}")
            else:
                lines.append(f"nft add chain {table} {chain}")
                lines.append(f"nft add rule {table} {chain} {line}")
        elif chain:
            lines.append(f"nft add rule {table} {chain} {line}")
        elif other:
            other.append(line)
            depth += line.endswith("{")
        else:  # an attribute of the table itself (flags, comment)
            lines.append(f"nft add table {table} {{ {line} }}")
    return tuple(lines)
