"""Mesh membership: which IPs are enrolled workloads, on which node, with which identity.

A source proxy tunnels to a destination only when the destination is in the mesh, and it must
know the identity to expect there.  On standalone hosts the directory is a shared folder (a
network file system, or one folder when the "nodes" share a machine): every agent publishes its
own enrolled workloads as `<folder>/<node>.json` (written to a temporary file and renamed, so a
reader never sees half a file) and reads everyone's files.  `entries_for` and `merge` are pure;
`publish` and `read_folder` are the file adapter.  The files hold no secrets (IPs and SPIFFE IDs)
and are mode 0644.

A node's file is its own to write: an entry is only trusted for identities of its node's file.
(An attacker who can write the shared folder can redirect where traffic is tunnelled, but not
impersonate an identity: the peer still has to present a certificate for the expected ID.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from agent.control.protocol import DirectoryEntry
from agent.workloads import Workload

SUFFIX = ".json"


def entries_for(
    node: str, workloads: Iterable[Workload], trust_domain: str
) -> tuple[DirectoryEntry, ...]:
    """This node's directory entries: one per address of every enrolled workload."""
    return tuple(
        sorted(
            (
                DirectoryEntry(ip=ip, identity=w.identity(trust_domain), node=node)
                for w in workloads
                for ip in w.ips
            ),
            key=lambda e: (e.ip, e.node),
        )
    )


def merge(per_node: Mapping[str, Iterable[DirectoryEntry]]) -> tuple[DirectoryEntry, ...]:
    """All nodes' entries; an IP claimed by two nodes goes to the alphabetically first node,
    deterministically, so every node's proxy makes the same choice."""
    chosen: dict[str, DirectoryEntry] = {}
    for node in sorted(per_node):
        for entry in per_node[node]:
            if entry.node == node:
                chosen.setdefault(entry.ip, entry)
    return tuple(sorted(chosen.values(), key=lambda e: e.ip))


def publish(folder: Path, node: str, entries: Iterable[DirectoryEntry]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps(
        {
            "node": node,
            "entries": [{"ip": e.ip, "identity": e.identity, "node": e.node} for e in entries],
        },
        indent=1,
    )
    tmp = folder / f".{node}{SUFFIX}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
    os.replace(tmp, folder / f"{node}{SUFFIX}")


def read_folder(folder: Path) -> dict[str, tuple[DirectoryEntry, ...]]:
    """Every node's published entries; unreadable or malformed files are skipped (logged by
    the caller through the returned absence), never fatal."""
    out: dict[str, tuple[DirectoryEntry, ...]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        try:
            raw = json.loads(path.read_text())
            node = str(raw["node"])
            out[node] = tuple(
                DirectoryEntry(str(e["ip"]), str(e["identity"]), str(e["node"]))
                for e in raw["entries"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
