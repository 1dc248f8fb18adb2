"""The interface between the agent and a redirection backend, and taking pods over from others.

The agent only ever asks a backend four things about a pod's network namespace, given by path:
`apply` (install or repair Ferry's redirection; idempotent), `remove` (delete all of it; fine if
none is there), `inspect` (read what the kernel holds back and compare it with the desired state)
and `installed` (whether anything of Ferry's is there).  Each call blocks (the agent runs it in a
thread) and raises on failure, naming the namespace.  `IptablesRedirection` and
`NftablesRedirection` are the real ones; tests use a recording fake, so enrollment order and
rollback are tested without a kernel.

A node runs one backend, but a pod may still hold another backend's rules: the agent ran with
another backend before (an operator switched, or `auto` chose differently).  Both backends'
rules redirect to the same listeners and the policy routing is one shared state
(`agent.redirect.routing`), so having both for a moment is harmless; leaving the old ones is not
(they would keep intercepting after an unenroll, and a drift repair would never see them).  So
every backend also offers `ForeignRules`: its own rules as command lines and their removal, the
shared routing left alone.  `SoleRedirection` is the selected backend with the others' rules
removed: `apply` installs the selected backend's state first (never a moment without
redirection) and then removes every other backend's rules; `inspect` reports another backend's
rules as unexpected, so the reconcile loop repairs (migrates) every enrolled pod on its first
tick after a switch and `agent status` shows them until then; `remove` and `installed` cover
every backend, so an unenrolled pod keeps nothing of any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent.redirect.rules import RedirectionReport


class RedirectionBackend(Protocol):
    def apply(self, netns: Path) -> None: ...

    def remove(self, netns: Path) -> None: ...

    def inspect(self, netns: Path) -> RedirectionReport: ...

    def installed(self, netns: Path) -> bool: ...


class ForeignRules(Protocol):
    """What a backend offers so another can take a pod over from it (`name`: "iptables", ...)."""

    @property
    def name(self) -> str: ...

    def own_rules(self, netns: Path) -> tuple[str, ...]: ...

    def remove_own_rules(self, netns: Path) -> None: ...


class SoleRedirection:
    """The selected backend, and no other backend's rules beside it."""

    def __init__(self, selected: RedirectionBackend, others: Sequence[ForeignRules]) -> None:
        self.selected = selected
        self.others = tuple(others)

    def apply(self, netns: Path) -> None:
        self.selected.apply(netns)
        for other in self.others:
            if other.own_rules(netns):
                other.remove_own_rules(netns)

    def remove(self, netns: Path) -> None:
        for other in self.others:
            if other.own_rules(netns):
                other.remove_own_rules(netns)
        self.selected.remove(netns)

    def inspect(self, netns: Path) -> RedirectionReport:
        report = self.selected.inspect(netns)
        foreign = tuple(line for other in self.others for line in other.own_rules(netns))
        if not foreign:
            return report
        return RedirectionReport("drifted", report.missing, report.unexpected + foreign)

    def installed(self, netns: Path) -> bool:
        return self.selected.installed(netns) or any(o.own_rules(netns) for o in self.others)
