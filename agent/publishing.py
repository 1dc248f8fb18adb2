"""Publishing this node's workloads to the mesh directory, and following everyone else's.

`Publisher` builds this node's entries from the enrollments (`agent.directory.entries_for`: one
per address of every enrolled workload, with its SPIFFE ID), writes them to the shared folder
(`publish`), and follows every node's file (`FolderReader`, which re-parses only files that
changed; bad entries are skipped and their reasons kept for `agent status`).  The merged view is
versioned: each change gets the next version and is handed to the proxy hub as a
`DirectoryChange`, which knows both the delta from the previous version (what proxies that are
up to date get) and the whole directory (what a new or lagging proxy gets, as a reset); both are
cut into bounded chunks (`agent.directory.plan_update`), so 100,000 entries travel like 10.
File work runs in a thread, off the agent's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.config import Config
from agent.directory import (
    DirectoryEntry,
    DirectoryUpdate,
    FolderReader,
    NodeFile,
    diff,
    entries_for,
    merge,
    plan_update,
    publish,
)
from agent.workloads import Workload


@dataclass(frozen=True)
class DirectoryChange:
    """The directory at `version`, and how it differs from `base` (the version before)."""

    version: int
    base: int
    egress: str
    upserts: tuple[DirectoryEntry, ...]
    removals: tuple[str, ...]
    entries: Mapping[str, DirectoryEntry] = field(repr=False)

    def delta(self) -> list[DirectoryUpdate]:
        """The chunks that take a proxy at `base` to `version`."""
        return plan_update(self.version, self.base, self.egress, self.upserts, self.removals,
                           reset=False)  # fmt: skip

    def full(self) -> list[DirectoryUpdate]:
        """The chunks that give any proxy the whole directory at `version`."""
        return plan_update(self.version, 0, self.egress, self.entries.values(), (), reset=True)


class DirectorySink(Protocol):
    async def send_directory(self, change: DirectoryChange) -> int: ...


class Publisher:
    def __init__(self, config: Config, state_dir: Path, sink: DirectorySink) -> None:
        self.node = config.node_name
        self.trust_domain = config.identity.trust_domain
        self.folder = Path(config.mesh.directory or state_dir / "directory")
        self.sink = sink
        self.reader = FolderReader(self.folder)
        self.current = DirectoryChange(0, 0, config.mesh.egress, (), (), {})
        self.problems: list[str] = []
        self.skipped = 0
        self._inputs: tuple[Any, ...] = ()

    def own(self, enrollments: Mapping[str, Workload]) -> tuple[DirectoryEntry, ...]:
        return entries_for(self.node, enrollments.values(), self.trust_domain)

    async def publish(self, enrollments: Mapping[str, Workload]) -> None:
        """Write this node's entries to the shared folder, then refresh the merged view."""
        await asyncio.to_thread(publish, self.folder, self.node, self.own(enrollments))
        await self.refresh(enrollments)

    async def refresh(self, enrollments: Mapping[str, Workload]) -> None:
        """Re-read the folder; when the merged view changed, send the change to the proxies."""
        nodes, problems = await asyncio.to_thread(self.reader.read)
        own = self.own(enrollments)
        inputs = (own, self.reader.fingerprint, tuple(problems))
        if inputs == self._inputs:
            return  # no file and no workload changed: nothing to merge
        self._inputs = inputs
        self.problems = problems + [p for f in nodes.values() for p in f.problems]
        self.skipped = sum(f.skipped for f in nodes.values())
        merged = _merged(nodes, self.node, own)
        current = self.current
        if merged == current.entries:
            return
        upserts, removals = diff(current.entries, merged)
        self.current = DirectoryChange(current.version + 1, current.version, current.egress,
                                       upserts, removals, merged)  # fmt: skip
        await self.sink.send_directory(self.current)

    def status(self) -> dict[str, object]:
        return {
            "folder": str(self.folder),
            "version": self.current.version,
            "entries": len(self.current.entries),
            "skipped": self.skipped,
            "problems": self.problems[:10],
        }


def _merged(
    nodes: Mapping[str, NodeFile], node: str, own: tuple[DirectoryEntry, ...]
) -> dict[str, DirectoryEntry]:
    per_node = {name: f.entries for name, f in nodes.items()}
    per_node[node] = own  # our own entries come from the enrollments, not from the file
    return {e.ip: e for e in merge(per_node)}
