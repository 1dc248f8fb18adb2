"""Publishing this node's workloads to the mesh directory, and following everyone else's.

`Publisher` builds this node's entries from the enrollments (`agent.directory.entries_for`: one
per address of every enrolled workload, with its SPIFFE ID), writes them to the shared folder
(`publish`), and refreshes the merged view of all nodes' files (`read_folder`, `merge`).  When the
merged view changed it hands the new directory to the proxy hub, which sends it to every proxy;
the same `message()` goes into each snapshot.  This module and `ProxyHub.send_directory` are the
only places that know how the directory travels to the proxies (today one whole `Directory`
message).  File work runs in a thread, off the agent's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from agent.config import Config
from agent.control.protocol import Directory
from agent.directory import DirectoryEntry, entries_for, merge, publish, read_folder
from agent.workloads import Workload


class DirectorySink(Protocol):
    async def send_directory(self, directory: Directory) -> int: ...


class Publisher:
    def __init__(self, config: Config, state_dir: Path, sink: DirectorySink) -> None:
        self.node = config.node_name
        self.trust_domain = config.identity.trust_domain
        self.egress = config.mesh.egress
        self.folder = Path(config.mesh.directory or state_dir / "directory")
        self.sink = sink
        self.directory: tuple[DirectoryEntry, ...] = ()

    def own(self, enrollments: Mapping[str, Workload]) -> tuple[DirectoryEntry, ...]:
        return entries_for(self.node, enrollments.values(), self.trust_domain)

    def message(self) -> Directory:
        return Directory(self.directory, self.egress)

    async def publish(self, enrollments: Mapping[str, Workload]) -> None:
        """Write this node's entries to the shared folder, then refresh the merged view."""
        await asyncio.to_thread(publish, self.folder, self.node, self.own(enrollments))
        await self.refresh(enrollments)

    async def refresh(self, enrollments: Mapping[str, Workload]) -> None:
        """Re-read every node's file; send the merged directory to the proxies if it changed."""
        per_node = await asyncio.to_thread(read_folder, self.folder)
        per_node[self.node] = self.own(enrollments)
        merged = merge(per_node)
        if merged != self.directory:
            self.directory = merged
            await self.sink.send_directory(self.message())

    def status(self) -> dict[str, object]:
        return {"folder": str(self.folder), "entries": len(self.directory)}
