"""AuthorizationPolicy matching: how a field's values match an attribute (pure).

Each matcher compiles one list of policy values, once, into one function over the attribute's
value; `agent.policy.authz_rules` pairs it with the getter that reads the attribute from `Facts`.
Istio's rules (semantics 1.6-1.12): strings are exact, `prefix*`, `*suffix`, or `*` (non-empty;
present for headers, hosts and methods); hosts compare case-insensitively, port included; paths
are the normalized path (`agent.policy.facts.normalize_path`), with `{*}`/`{**}` templates;
principals `<td>/ns/<ns>/sa/<sa>` compare with "spiffe://" prepended, and a principal written
with trust domain `cluster.local` means the configured trust domain; namespaces and service
accounts are read from the peer's SPIFFE ID (Ferry's are always `spiffe://td/ns/<ns>/sa/<sa>`,
checked by `agent.identity.spiffe`, so a namespace is the segment after `/ns/`);
`remoteIpBlocks` and `remote.ip` are the source IP (Ferry sees the client directly: no trusted
proxies, no X-Forwarded-For); JWT claims may be strings or lists of strings, nested with
`[a][b]`, and the `scope` and `permission` claims are split on spaces.

Addresses, IP blocks and SPIFFE IDs are parsed once per distinct value (`lru_cache`), and IP
blocks are looked up in a `CidrTable` (one dict per prefix length), not tested one by one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, Generic, TypeVar

from agent.policy.authz import TEMPLATE_ANY, TEMPLATE_ONE, is_path_template

SPIFFE = "spiffe://"
CLUSTER_LOCAL = "cluster.local"
SPACE_DELIMITED_CLAIMS = frozenset({"scope", "permission"})

T = TypeVar("T")
Match = Callable[[T], bool]
Address = tuple[int, int]  # (IP version, address as an integer)


# --- facts, parsed once per distinct value ----------------------------------------------------


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> Address | None:
    """ "10.0.0.1" -> (4, 167772161); IPv4-mapped IPv6 counts as IPv4; None if not an address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


@lru_cache(maxsize=16384)
def parse_block(block: str) -> tuple[int, int, int]:
    """ "10.1.0.0/16" -> (4, 16, 0x0A01): version, host bits, network address >> host bits."""
    network = ipaddress.ip_network(block, strict=False)
    shift = network.max_prefixlen - network.prefixlen
    return network.version, shift, int(network.network_address) >> shift


@lru_cache(maxsize=4096)
def identity_of(principal: str) -> tuple[str, str, str] | None:
    """ "spiffe://td/ns/n/sa/s" -> ("td", "n", "s"); None for "" or anything else."""
    parts = principal.split("/")
    if len(parts) == 7 and parts[:2] == ["spiffe:", ""] and parts[3] == "ns" and parts[5] == "sa":
        return parts[2], parts[4], parts[6]
    return None


# --- matchers: one compiled function per value list --------------------------------------------


def _always(_: str) -> bool:
    return True


def _non_empty(value: str) -> bool:
    return value != ""


def string_matcher(
    patterns: Iterable[str], *, star_means_present: bool = False, fold_case: bool = False
) -> Match[str]:
    """Istio's string patterns: `*` (any non-empty value; any value at all, even empty, with
    `star_means_present`, as Envoy's present_match for headers, hosts and methods), `*suffix`,
    `prefix*` (both match the bare affix too), else exact.  `fold_case` for hosts."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for pattern in patterns:
        pattern = pattern.lower() if fold_case else pattern
        if pattern == "*":
            return _always if star_means_present else _non_empty
        if pattern.startswith("*"):
            suffixes.append(pattern[1:])
        elif pattern.endswith("*"):
            prefixes.append(pattern[:-1])
        else:
            exact.add(pattern)
    starts, ends, values = tuple(prefixes), tuple(suffixes), frozenset(exact)
    if not starts and not ends and not fold_case:
        return values.__contains__

    def match(value: str) -> bool:
        if fold_case:
            value = value.lower()
        return value in values or value.startswith(starts) or value.endswith(ends)

    return match


def with_trust_domain(principal: str, trust_domain: str) -> str:
    """A policy principal written with trust domain `cluster.local` names the local trust domain
    (Istio's trust-domain aliasing with no configured aliases); others stay as written."""
    parts = principal.split("/")
    if len(parts) == 5 and parts[0] == CLUSTER_LOCAL:
        return "/".join([trust_domain, *parts[1:]])
    return principal


def principal_matcher(patterns: Iterable[str], trust_domain: str) -> Match[str]:
    """Principals `<td>/ns/<ns>/sa/<sa>` against SPIFFE IDs: exact and `prefix*` with "spiffe://"
    prepended, `*suffix` as "spiffe://" + anything + suffix, `*` any non-empty ID."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    for pattern in patterns:
        pattern = with_trust_domain(pattern, trust_domain)
        if pattern == "*":
            return _non_empty
        if pattern.startswith("*"):
            suffixes.append(pattern[1:])
        elif pattern.endswith("*"):
            prefixes.append(SPIFFE + pattern[:-1])
        else:
            exact.add(SPIFFE + pattern)
    starts, ends, values = tuple(prefixes), tuple(suffixes), frozenset(exact)
    if not starts and not ends:
        return values.__contains__
    size = len(SPIFFE)

    def match(value: str) -> bool:
        return (
            value in values
            or value.startswith(starts)
            or (value.startswith(SPIFFE) and value[size:].endswith(ends))
        )

    return match


def namespace_matcher(patterns: Iterable[str]) -> Match[str]:
    """Namespaces: Istio turns every `*` into `.*` (anywhere in the value), else exact."""
    exact = frozenset(p for p in patterns if "*" not in p)
    globs = [
        re.compile(".*".join(re.escape(part) for part in p.split("*")))
        for p in patterns
        if "*" in p
    ]
    if not globs:
        return exact.__contains__
    return lambda v: v in exact or any(g.fullmatch(v) for g in globs)


def _template(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\*\*\}|\{\*\})", pattern)
    return re.compile(
        "".join(
            "[^/]+" if part == TEMPLATE_ONE else ".*" if part == TEMPLATE_ANY else re.escape(part)
            for part in parts
        )
    )


def path_matcher(patterns: Iterable[str]) -> Match[str]:
    """Paths: string patterns as `string_matcher` (`*` non-empty), plus URI templates where `{*}`
    is one segment and `{**}` any rest."""
    patterns = list(patterns)
    templates = [_template(p) for p in patterns if is_path_template(p)]
    strings = string_matcher(p for p in patterns if not is_path_template(p))
    if not templates:
        return strings
    return lambda v: strings(v) or any(t.fullmatch(v) for t in templates)


class CidrTable(Generic[T]):
    """IP blocks -> items, looked up by address: one dict per (version, prefix length), so a
    lookup costs one dict probe per distinct prefix length, not one test per block."""

    __slots__ = ("_tables",)

    def __init__(self, entries: Iterable[tuple[str, T]] = ()) -> None:
        tables: dict[tuple[int, int], dict[int, list[T]]] = {}
        for block, item in entries:
            version, shift, key = parse_block(block)
            tables.setdefault((version, shift), {}).setdefault(key, []).append(item)
        self._tables = {
            version: tuple((shift, t) for (v, shift), t in sorted(tables.items()) if v == version)
            for version in (4, 6)
        }

    def find(self, address: Address) -> Iterator[list[T]]:
        """The items of every block containing `address`, one list per block."""
        version, value = address
        for shift, table in self._tables[version]:
            items = table.get(value >> shift)
            if items is not None:
                yield items

    def __contains__(self, address: Address) -> bool:
        return any(True for _ in self.find(address))


def blocks(values: Iterable[str]) -> Match[Address]:
    """IP blocks (`10.0.0.0/8`, or one address) containing an address."""
    table: CidrTable[None] = CidrTable((value, None) for value in values)
    return table.__contains__


def _any_element(match: Match[str]) -> Match[tuple[str, ...]]:
    return lambda values: any(match(v) for v in values)


def port_set(values: tuple[str, ...]) -> Match[int]:
    """Ports: exact numbers."""
    return frozenset(int(v) for v in values).__contains__


def host_matcher(values: tuple[str, ...]) -> Match[str]:
    """Hosts: string patterns, case-insensitive, `*` any host present."""
    return string_matcher(values, star_means_present=True, fold_case=True)


def present_matcher(values: tuple[str, ...]) -> Match[str]:
    """Methods and headers: string patterns, `*` any value present."""
    return string_matcher(values, star_means_present=True)


def list_matcher(values: tuple[str, ...]) -> Match[tuple[str, ...]]:
    """Audiences and claims: string patterns matching any one of the attribute's values."""
    return _any_element(string_matcher(values))


# --- JWT claims: the values a claim key names --------------------------------------------------


def claim_values(claims: Mapping[str, Any], path: Sequence[str]) -> tuple[str, ...] | None:
    """The string values of a (nested) claim: a string is one value, a list gives its strings;
    `scope` and `permission` strings are split on spaces; anything else has no values."""
    value: Any = claims
    for name in path:
        if not isinstance(value, Mapping) or name not in value:
            return None
        value = value[name]
    if isinstance(value, str):
        if len(path) == 1 and path[0] in SPACE_DELIMITED_CLAIMS:
            return tuple(part for part in value.split(" ") if part)
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return None
