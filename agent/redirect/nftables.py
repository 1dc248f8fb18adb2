"""The nftables redirection backend: one `table inet ferry` per pod, through libnftables.

`NftablesRedirection` programs the table of `agent.redirect.nft_rules.nft_table` (the same
desired rules the iptables backend programs, translated) and the policy routing of
`agent.redirect.routing` inside a pod's network namespace, reads them back and removes them.
Every method takes the namespace's path and does its work on the `NetnsExecutor`'s thread,
which enters the namespace for the duration of the call.

How the table changes: `apply` lists the table and, unless it already holds exactly the desired
chains and rules (then nothing is written, so the periodic reconcile rewrites nothing), submits
one JSON batch through libnftables (Debian's `python3-nftables`) that adds, deletes and adds the
table again with its chains and rules.  The kernel commits a batch atomically: a packet sees the
old table or the new one, never a half-written one, and a failed batch changes nothing.
`remove` deletes the table in one batch too.  Only `table inet ferry` is ever touched; other
tables in the pod (iptables-nft's, anyone's) are left alone.

Reading back: the table is listed as text (`nft list table inet ferry`) and turned into command
lines with `nft_rules.listing_commands`; the desired table renders to the same form, so drift
(a flushed chain, a deleted table, an added rule) is reported in nft's own words.

libnftables specifics, confined here: a context opens its netlink socket when it is created, in
the creating thread's namespace, so every call makes its own context inside the pod's namespace
and drops it there; the module lock keeps two threads out of the library at once (its global
initialisation is not thread-safe).  `import nftables` fails where the bindings are missing;
`agent.redirect.select` turns that into a reason and never imports this module there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import nftables

from agent.config import RedirectionConfig
from agent.netns import NetnsExecutor
from agent.redirect.nft_rules import (
    TABLE_REF,
    Json,
    commands,
    listing_commands,
    nft_table,
    removal,
    transaction,
)
from agent.redirect.routing import (
    apply_routing,
    desired_routing,
    read_routing,
    remove_routing,
)
from agent.redirect.rules import RedirectionError, RedirectionReport, compare, desired_rules

T = TypeVar("T")

_LOCK = threading.Lock()
_NO_TABLE = "No such file or directory"


class NftablesRedirection:
    """In-pod redirection with one nftables table and policy routing."""

    name = "nftables"

    def __init__(self, cfg: RedirectionConfig, executor: NetnsExecutor) -> None:
        self.cfg = cfg
        self.executor = executor
        table = nft_table(desired_rules(cfg))
        self.commands = commands(table)
        self.transaction = transaction(table)
        self.routing = desired_routing(cfg)

    def apply(self, netns: Path) -> None:
        """Install or repair Ferry's table and routing in `netns`; idempotent."""

        def inside() -> None:
            if _read() != self.commands:
                _run(self.transaction, f"replace table {TABLE_REF}")
            apply_routing(self.cfg)

        self._call(netns, inside)

    def inspect(self, netns: Path) -> RedirectionReport:
        """Compare what the kernel holds in `netns` with the desired table and routing."""
        table, routing = self._call(netns, lambda: (_read(), read_routing(self.cfg)))
        return compare(self.commands + self.routing.commands(), table + routing.commands())

    def remove(self, netns: Path) -> None:
        """Delete Ferry's table and routing from `netns`; fine if none are there."""

        def inside() -> None:
            _remove_table()
            remove_routing(self.cfg)

        self._call(netns, inside)

    def installed(self, netns: Path) -> bool:
        """Whether anything of Ferry's (the table or a route) is present in `netns`."""
        return self.inspect(netns).state != "missing"

    def own_rules(self, netns: Path) -> tuple[str, ...]:
        """Ferry's table in `netns` as nft command lines (not the routing, which is shared)."""
        return self._call(netns, _read)

    def remove_own_rules(self, netns: Path) -> None:
        """Delete Ferry's table from `netns`, leaving the routing."""
        self._call(netns, _remove_table)

    def _call(self, netns: Path, fn: Callable[[], T]) -> T:
        try:
            return self.executor.call(netns, fn)
        except RedirectionError as exc:
            raise RedirectionError(f"netns {netns}: {exc}") from exc
        except OSError as exc:
            raise RedirectionError(f"netns {netns}: cannot enter: {exc.strerror}") from exc


def _nft(fn: Callable[[Any], T]) -> T:
    """`fn` with a fresh libnftables context made in the calling thread's netns."""
    with _LOCK:
        return fn(nftables.Nftables())


def _error(text: str) -> str:
    return " ".join(text.split()) or "no error text"


def _read() -> tuple[str, ...]:
    """Ferry's table in the calling thread's netns, as command lines; () when there is none."""
    rc, out, err = _nft(lambda ctx: ctx.cmd(f"list table {TABLE_REF}"))
    if rc == 0:
        return listing_commands(out)
    if _NO_TABLE in err:
        return ()
    raise RedirectionError(f"`nft list table {TABLE_REF}` failed: {_error(err)}")


def list_ruleset() -> str:
    """`nft list ruleset` in the calling thread's netns (for `auto` detection)."""
    rc, out, err = _nft(lambda ctx: ctx.cmd("list ruleset"))
    if rc != 0:
        raise RedirectionError(f"`nft list ruleset` failed: {_error(err)}")
    return str(out)


def _run(batch: Json, what: str) -> None:
    rc, _out, err = _nft(lambda ctx: ctx.json_cmd(batch))
    if rc != 0:
        raise RedirectionError(f"nft: {what} failed: {_error(err)}")


def _remove_table() -> None:
    if _read():
        _run(removal(), f"delete table {TABLE_REF}")
