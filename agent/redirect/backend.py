"""The interface between the agent and a redirection backend.

The agent only ever asks a backend four things about a pod's network namespace, given by path:
`apply` (install or repair Ferry's redirection; idempotent), `remove` (delete all of it; fine if
none is there), `inspect` (read what the kernel holds back and compare it with the desired state)
and `installed` (whether anything of Ferry's is there).  Each call blocks (the agent runs it in a
thread) and raises on failure, naming the namespace.  `IptablesRedirection` is the real one;
tests use a recording fake, so enrollment order and rollback are tested without a kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agent.redirect.rules import RedirectionReport


class RedirectionBackend(Protocol):
    def apply(self, netns: Path) -> None: ...

    def remove(self, netns: Path) -> None: ...

    def inspect(self, netns: Path) -> RedirectionReport: ...

    def installed(self, netns: Path) -> bool: ...
