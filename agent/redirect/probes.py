"""Kubelet health probes to enrolled pods: the node's own connections get a source pods trust.

kubelet probes a pod (HTTP, TCP) from the node's network namespace, in plaintext.  In a strict
pod the inbound redirection sends every plaintext connection to the proxy, which refuses it, so
the probes would fail.  The source address alone cannot tell kubelet from anyone else: traffic
forwarded by the node (a NodePort with kube-proxy's masquerade, a CNI's SNAT) carries the node's
own address too.  What only the node's own connections have is a local socket, so, as Istio
ambient does, the node rewrites the source of exactly those connections to a link-local address
that nothing else uses, `PROBE_SOURCE` (169.254.7.127, fd16:9254:7127:1337:ffff:ffff:ffff:ffff),
and every pod's redirection lets that source through to the app (all three backends:
`agent.redirect.rules`, and so the nftables translation, and `sk_lookup` in bpf/ferry.c).

The node side is one chain in the node's nat table, `FERRY_POSTROUTING`, jumped to from
POSTROUTING, with one rule per enrolled pod address:

    -A FERRY_POSTROUTING -d <pod ip>/32 -p tcp -m owner --socket-exists
        -j SNAT --to-source 169.254.7.127

`-m owner --socket-exists` matches only packets of a local socket (forwarded packets have
none), and the SNAT is undone on the reply by conntrack, so a pod answers a probe through the
node as usual.  A pod cannot forge a connection from 169.254.7.127: the pod's reply goes to the
node, which has no such connection.  Nothing else changes for the node's own connections but
their source.  It is on with `kubernetes.enabled` (off it, the node's own connections are
redirected like any other; `kubernetes.probe_snat: false` turns it off there too).

`host_rules(addresses)` computes the chain as plain data (the same `RuleSet` the in-pod iptables
backend uses, so it renders and compares the same way); `ProbeSnat` is the thin adapter: its
`publish(enrollments)` (the enrollment path calls it on every change, with the directory
publication it wraps) makes the node's table match, in the agent's own network namespace,
through the iptables backend's table writer (legacy tables, atomic per table), whatever backend
redirects inside the pods.  `remove_host_rules` deletes the chain (`agent cleanup`).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from agent.netns import NetnsExecutor
from agent.redirect.rules import FAMILIES, PROBE_SOURCE, ChainRef, Extension, Option, Rule, RuleSet
from agent.workloads import Workload

FERRY_POSTROUTING = "FERRY_POSTROUTING"
OWN_NETNS = Path("/proc/self/ns/net")  # the agent's (the main thread's) network namespace


class Publisher(Protocol):
    async def publish(self, enrollments: Mapping[str, Workload]) -> None: ...


def host_rules(addresses: Iterable[str], ipv6: bool = True) -> RuleSet:
    """The node's SNAT chain for the enrolled pods' `addresses` (empty: no chain at all)."""
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for address in sorted(set(addresses), key=lambda a: ipaddress.ip_address(a).packed):
        version = ipaddress.ip_address(address).version
        if version == 4 or ipv6:
            by_family[version].append(address)
    chains: list[ChainRef] = []
    rules: list[Rule] = []
    for family in FAMILIES:
        if not by_family[family]:
            continue
        chains.append(ChainRef(family, "nat", FERRY_POSTROUTING))
        rules.append(Rule(family, "nat", "POSTROUTING", Extension(FERRY_POSTROUTING),
                          comment="the node's own connections to enrolled pods"))  # fmt: skip
        source = PROBE_SOURCE[family].split("/")[0]
        bits = 32 if family == 4 else 128
        for address in by_family[family]:
            rules.append(
                Rule(
                    family,
                    "nat",
                    FERRY_POSTROUTING,
                    Extension("SNAT", (Option("to-source", (source,)),)),
                    protocol="tcp",
                    destination=f"{address}/{bits}",
                    matches=(Extension("owner", (Option("socket-exists"),)),),
                    comment="a local socket's connection to an enrolled pod (kubelet probes) "
                    "comes from the probe source, which the pod lets through",
                )
            )
    return RuleSet(tuple(chains), tuple(rules))


def addresses_of(enrollments: Mapping[str, Workload]) -> list[str]:
    return [ip for workload in enrollments.values() for ip in workload.ips]


class ProbeSnat:
    """Keeps the node's probe SNAT chain matching the enrolled pods, then publishes on."""

    def __init__(self, inner: Publisher, executor: NetnsExecutor, enabled: bool,
                 ipv6: bool) -> None:  # fmt: skip
        self.inner = inner
        self.executor = executor
        self.enabled = enabled
        self.ipv6 = ipv6

    async def publish(self, enrollments: Mapping[str, Workload]) -> None:
        wanted = host_rules(addresses_of(enrollments) if self.enabled else (), self.ipv6)
        await asyncio.to_thread(self.executor.call, OWN_NETNS, lambda: _write(wanted))
        await self.inner.publish(enrollments)


def remove_host_rules() -> None:
    """Delete the node's probe chain (in the calling thread's netns); fine if there is none."""
    _write(RuleSet())


def _write(wanted: RuleSet) -> None:
    from agent.redirect.iptables import apply_ruleset  # python-iptables: only where it runs

    apply_ruleset(wanted, ("nat",))
