"""Policy routing for the inbound return path: desired state as data, and a netlink adapter.

The proxy delivers inbound connections to the app from a socket with IP_TRANSPARENT that spoofs
the client's address, so the app's replies are addressed to the client, not to the proxy.  The
mangle rules in `agent.redirect.rules` restore the connection's connmark onto those reply packets
as their fwmark, and two routing entries send every packet with that mark to the local stack
over lo, where the proxy's transparent socket takes it:

    ip -4 rule add fwmark <connmark>/<mask> lookup <route_table>
    ip -4 route add local 0.0.0.0/0 dev lo table <route_table>

(and the same with `-6` and `::/0` when IPv6 is on).  This is Istio ambient's in-pod shape.

`desired_routing(cfg)` is pure.  `read_routing`, `apply_routing` and `remove_routing` talk
netlink through pyroute2's `IPRoute` in the *calling thread's* network namespace, so callers run
them inside the pod's namespace (see `agent.netns.NetnsExecutor`).  What counts as Ferry's:
policy rules that look up `route_table` or match Ferry's connmark, and every route in
`route_table`.  `apply_routing` makes exactly that equal to the desired state (adding what is
missing, tolerating EEXIST, deleting what is not desired) and `remove_routing` deletes all of it,
tolerating ENOENT/ESRCH, so both are idempotent and leave no residue.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.config import RedirectionConfig
from agent.redirect.rules import FAMILIES, Family, RedirectionError, format_mark

T = TypeVar("T")

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
ANY = {4: "0.0.0.0/0", 6: "::/0"}
RT_SCOPE_HOST = 254
ROUTE_TYPES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
}
ROUTE_TYPE_NUMBERS = {name: number for number, name in ROUTE_TYPES.items()}


@dataclass(frozen=True)
class PolicyRule:
    """`ip rule`: packets whose fwmark matches go to `table`.  `priority` is not compared."""

    family: Family
    table: int
    fwmark: int | None = None
    fwmask: int | None = None
    priority: int | None = field(default=None, compare=False)

    def command(self) -> str:
        words = [f"ip -{self.family} rule add"]
        if self.fwmark is not None:
            mask = self.fwmask if self.fwmask is not None else 0xFFFFFFFF
            words.append(f"fwmark {format_mark(self.fwmark, mask)}")
        words.append(f"lookup {self.table}")
        return " ".join(words)


@dataclass(frozen=True)
class Route:
    """`ip route` in a given table; `local 0.0.0.0/0 dev lo` for Ferry."""

    family: Family
    table: int
    destination: str
    kind: str = "local"
    device: str | None = "lo"
    gateway: str | None = None

    def command(self) -> str:
        words = [f"ip -{self.family} route add {self.kind} {self.destination}"]
        if self.gateway is not None:
            words.append(f"via {self.gateway}")
        if self.device is not None:
            words.append(f"dev {self.device}")
        words.append(f"table {self.table}")
        return " ".join(words)


@dataclass(frozen=True)
class Routing:
    """Ferry's policy rules and routes, desired or observed."""

    rules: tuple[PolicyRule, ...] = ()
    routes: tuple[Route, ...] = ()

    def commands(self) -> tuple[str, ...]:
        """Command lines in a canonical order, for comparison and reports."""
        rules = sorted(self.rules, key=lambda r: (r.family, r.command()))
        routes = sorted(self.routes, key=lambda r: (r.family, r.command()))
        return tuple(r.command() for r in rules) + tuple(r.command() for r in routes)


def desired_routing(cfg: RedirectionConfig) -> Routing:
    """The return-path routing for `cfg`: IPv4 always, IPv6 when `cfg.ipv6`."""
    families = [f for f in FAMILIES if f == 4 or cfg.ipv6]
    return Routing(
        rules=tuple(PolicyRule(f, cfg.route_table, cfg.connmark, cfg.mark_mask) for f in families),
        routes=tuple(Route(f, cfg.route_table, ANY[f]) for f in families),
    )


def _is_ours(cfg: RedirectionConfig, rule: PolicyRule) -> bool:
    return rule.table == cfg.route_table or (
        rule.fwmark == cfg.connmark and rule.fwmask == cfg.mark_mask
    )


def _netlink(command: str, fn: Callable[[], T], tolerate: tuple[int, ...] = ()) -> T | None:
    try:
        return fn()
    except NetlinkError as exc:
        if exc.code in tolerate:
            return None
        raise RedirectionError(f"`{command}` failed: {exc.args[-1]} (errno {exc.code})") from exc
    except OSError as exc:
        raise RedirectionError(f"`{command}` failed: {exc.strerror}") from exc


def _read_rules(ipr: Any, cfg: RedirectionConfig, family: Family) -> list[PolicyRule]:
    found = []
    for msg in ipr.get_rules(family=AF[family]):
        rule = PolicyRule(
            family,
            table=msg.get_attr("FRA_TABLE") or msg["table"],
            fwmark=msg.get_attr("FRA_FWMARK"),
            fwmask=msg.get_attr("FRA_FWMASK"),
            priority=msg.get_attr("FRA_PRIORITY"),
        )
        if _is_ours(cfg, rule):
            found.append(rule)
    return found


LOOPBACK_INDEX = 1  # `lo` is the first link of every network namespace


def _device_name(ipr: Any, oif: int | None) -> str | None:
    """The name of an output interface; `lo` without a link dump (the common, hot case)."""
    if oif is None:
        return None
    if oif == LOOPBACK_INDEX:
        return "lo"
    links = ipr.get_links(oif)
    return str(links[0].get_attr("IFLA_IFNAME")) if links else str(oif)


def _read_routes(ipr: Any, cfg: RedirectionConfig, family: Family) -> list[Route]:
    found = []
    for msg in ipr.get_routes(family=AF[family], table=cfg.route_table):
        if (msg.get_attr("RTA_TABLE") or msg["table"]) != cfg.route_table:
            continue
        dst = msg.get_attr("RTA_DST") or ANY[family].split("/")[0]
        oif = msg.get_attr("RTA_OIF")
        found.append(
            Route(
                family,
                cfg.route_table,
                f"{dst}/{msg['dst_len']}",
                kind=ROUTE_TYPES.get(msg["type"], str(msg["type"])),
                device=_device_name(ipr, oif),
                gateway=msg.get_attr("RTA_GATEWAY"),
            )
        )
    return found


def _read(ipr: Any, cfg: RedirectionConfig) -> Routing:
    rules: list[PolicyRule] = []
    routes: list[Route] = []
    for family in FAMILIES:
        rules.extend(
            _netlink(f"ip -{family} rule show", partial(_read_rules, ipr, cfg, family)) or []
        )
        routes.extend(
            _netlink(
                f"ip -{family} route show table {cfg.route_table}",
                partial(_read_routes, ipr, cfg, family),
            )
            or []
        )
    return Routing(tuple(rules), tuple(routes))


def read_routing(cfg: RedirectionConfig) -> Routing:
    """Ferry's policy rules and routes in the calling thread's netns, both families."""
    with IPRoute() as ipr:
        return _read(ipr, cfg)


def _add_rule(ipr: Any, rule: PolicyRule) -> None:
    spec: dict[str, Any] = {"family": AF[rule.family], "table": rule.table}
    if rule.fwmark is not None:
        spec.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
    _netlink(rule.command(), lambda: ipr.rule("add", **spec), tolerate=(errno.EEXIST,))


def _delete_rule(ipr: Any, rule: PolicyRule) -> None:
    spec: dict[str, Any] = {"family": AF[rule.family], "table": rule.table}
    if rule.fwmark is not None:
        spec.update(fwmark=rule.fwmark, fwmask=rule.fwmask)
    if rule.priority is not None:
        spec["priority"] = rule.priority
    _netlink(
        rule.command().replace(" add ", " del ", 1),
        lambda: ipr.rule("del", **spec),
        tolerate=(errno.ENOENT, errno.ESRCH),
    )


def _route_spec(ipr: Any, route: Route) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "family": AF[route.family],
        "dst": route.destination,
        "table": route.table,
        "type": ROUTE_TYPE_NUMBERS.get(route.kind, 1),
    }
    if route.kind == "local":
        spec["scope"] = RT_SCOPE_HOST
    if route.gateway is not None:
        spec["gateway"] = route.gateway
    if route.device is not None:
        index = [LOOPBACK_INDEX] if route.device == "lo" else ipr.link_lookup(ifname=route.device)
        if not index:
            raise RedirectionError(f"`{route.command()}` failed: no device {route.device!r}")
        spec["oif"] = index[0]
    return spec


def _add_route(ipr: Any, route: Route) -> None:
    spec = _route_spec(ipr, route)
    _netlink(route.command(), lambda: ipr.route("add", **spec), tolerate=(errno.EEXIST,))


def _delete_route(ipr: Any, route: Route) -> None:
    spec = _route_spec(ipr, route)
    _netlink(
        route.command().replace(" add ", " del ", 1),
        lambda: ipr.route("del", **spec),
        tolerate=(errno.ENOENT, errno.ESRCH),
    )


def apply_routing(cfg: RedirectionConfig) -> None:
    """Make Ferry's routing in the calling thread's netns equal `desired_routing(cfg)`."""
    desired = desired_routing(cfg)
    with IPRoute() as ipr:
        actual = _read(ipr, cfg)
        for rule in actual.rules:
            if rule not in desired.rules:
                _delete_rule(ipr, rule)
        for route in actual.routes:
            if route not in desired.routes:
                _delete_route(ipr, route)
        kept_rules = [r for r in actual.rules if r in desired.rules]
        for rule in desired.rules:
            if rule in kept_rules:
                kept_rules.remove(rule)
            else:
                _add_rule(ipr, rule)
        for route in desired.routes:
            if route not in actual.routes:
                _add_route(ipr, route)
        # A rule present twice (e.g. once at another priority) is one too many.
        for extra in kept_rules:
            _delete_rule(ipr, extra)


def remove_routing(cfg: RedirectionConfig) -> None:
    """Delete all of Ferry's policy rules and routes in the calling thread's netns."""
    with IPRoute() as ipr:
        actual = _read(ipr, cfg)
        for rule in actual.rules:
            _delete_rule(ipr, rule)
        for route in actual.routes:
            _delete_route(ipr, route)
