"""Mesh membership: which IPs are enrolled workloads, on which node, with which identity.

A source proxy tunnels to a destination only when the destination is in the mesh, and it must
know the identity to expect there.

The folder (standalone hosts).  The directory is a shared folder (a network file system, or one
folder when the "nodes" share a machine): every agent publishes its own enrolled workloads as
`<folder>/<node>.json` (written to a temporary file and renamed, so a reader never sees half a
file) and reads everyone's files.  `entries_for` and `merge` are pure; `publish` and
`FolderReader` are the file adapter.  The files hold no secrets (IPs and SPIFFE IDs) and are mode
0644.  A node's file is its own to write: an entry is only trusted for identities of its node's
file.  (An attacker who can write the shared folder can redirect where traffic is tunnelled, but
not impersonate an identity: the peer still has to present a certificate for the expected ID.)
`FolderReader` re-reads only files whose size, mtime or inode changed, so polling a folder of
100,000 entries costs a few `stat`s.

Entries.  `DirectoryEntry` is the one type and `to_json` / `parse_entry` the one encoding, used by
the folder, the agent <-> proxy protocol and the supervisor <-> worker channel alike.  Every entry
is validated on its own (`parse_entry`): a bad one is skipped and reported with the reason, never
the whole update.  An entry whose address is valid but whose identity is not stays in the table
with no identity: connections to that address are refused, never sent in plaintext (fail closed).

Updates.  The directory travels as versioned deltas in bounded chunks (`DirectoryUpdate`): a
change from version `base` to `version` upserts and removes entries; a `reset` update replaces
everything (a snapshot, or a proxy that missed a version).  `plan_update` cuts one change into
chunks of at most `max_bytes` encoded, so 100,000 entries cross a 64 KiB datagram channel; only the
`last` chunk of a version applies it.  `DirectoryTable` is the receiving side (the proxy's
supervisor and each worker): it assembles chunks, applies a complete change atomically, refuses an
update whose base is not its version (the sender then resets), and answers lookups in O(1)
(`identities`: ip -> expected identity, "" for an address to refuse).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from agent.identity.spiffe import is_spiffe_id
from agent.names import node_name
from agent.workloads import Workload

SUFFIX = ".json"
EGRESS = ("passthrough", "refuse")
MAX_CHUNK_BYTES = 48 * 1024  # leaves room for the envelope in a 64 KiB datagram
MAX_REPORTED = 10  # problems kept per read or update (the count is always exact)


class DirectoryError(ValueError):
    """A directory update cannot be applied (out of order, malformed envelope)."""


class DirectoryEntry(NamedTuple):  # a tuple: 100,000 of them are built per update, quickly
    ip: str
    identity: str  # "" : the published identity was invalid; the address is refused
    node: str

    def to_json(self) -> dict[str, str]:
        return {"ip": self.ip, "identity": self.identity, "node": self.node}


def parse_entry(raw: Any) -> DirectoryEntry:
    """Validate one published entry; ValueError naming the bad value.

    The address must parse (it is canonicalised); the node must be a DNS name; the identity must
    be a Ferry SPIFFE ID, else the entry is kept with identity "" (refused, see the module doc).
    A directory of 100,000 entries is validated on every worker, so the common shapes take fast
    paths: a dotted IPv4 address is already canonical, and names seen before are looked up.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"entry {raw!r:.200} is not an object")
    ip, identity, node = raw.get("ip"), raw.get("identity"), raw.get("node")
    if not isinstance(ip, str):
        raise ValueError(f"entry {raw!r:.200}: ip must be a string")
    canonical = ip if _IPV4.fullmatch(ip) else _canonical_ip(ip)
    if not isinstance(node, str):
        raise ValueError(f"entry {canonical}: node {node!r:.80} is not a string")
    if not _is_node(node):
        raise ValueError(f"entry {canonical}: node {node!r:.80} is not a DNS name")
    checked = identity if isinstance(identity, str) and is_spiffe_id(identity) else ""
    return DirectoryEntry(canonical, sys.intern(checked), sys.intern(node))


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")


def _canonical_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise ValueError(f"entry ip {ip!r:.80} is not an IP address") from None


@functools.lru_cache(maxsize=4096)
def _is_node(node: str) -> bool:
    try:
        node_name(node)
    except ValueError:
        return False
    return True


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


# -- the folder ---------------------------------------------------------------------------------


def publish(folder: Path, node: str, entries: Iterable[DirectoryEntry]) -> None:
    if not _is_node(node):  # never a path: `../x` must not leave the folder
        raise ValueError(f"node name {node!r} is not a DNS name")
    folder.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"node": node, "entries": [e.to_json() for e in entries]}, indent=1)
    tmp = folder / f".{node}{SUFFIX}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
    os.replace(tmp, folder / f"{node}{SUFFIX}")


@dataclass(frozen=True)
class NodeFile:
    """One node's published entries and what was wrong in its file."""

    entries: tuple[DirectoryEntry, ...]
    problems: tuple[str, ...] = ()
    skipped: int = 0


def parse_node_file(name: str, text: str) -> tuple[str, NodeFile]:
    """(node, its entries) from the text of `<node>.json`; ValueError if the file as a whole is
    unusable, bad entries are skipped and reported."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ValueError(f"{name}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise ValueError(f"{name}: expected an object with an 'entries' list")
    node = raw.get("node")
    if not isinstance(node, str) or f"{node}{SUFFIX}" != name:
        raise ValueError(f"{name}: node {node!r} does not match the file name")
    entries, problems = [], []
    for index, item in enumerate(raw["entries"]):
        try:
            entry = parse_entry(item)
        except ValueError as exc:
            problems.append(f"{name} entry {index}: {exc}")
            continue
        if entry.node != node:
            problems.append(f"{name} entry {index}: node {entry.node!r} is not {node!r}")
            continue
        if not entry.identity:
            problems.append(f"{name} entry {index}: identity {item.get('identity')!r} is not a "
                            f"SPIFFE ID; {entry.ip} is refused")  # fmt: skip
        entries.append(entry)
    skipped = len(raw["entries"]) - len(entries)
    return node, NodeFile(tuple(entries), tuple(problems[:MAX_REPORTED]), skipped)


@dataclass
class FolderReader:
    """Reads every node's file of a folder, re-parsing only files that changed since."""

    folder: Path
    _cache: dict[str, tuple[tuple[int, int, int], str, NodeFile]] = field(default_factory=dict)
    fingerprint: tuple[tuple[str, tuple[int, int, int]], ...] = ()  # of the files last read

    def read(self) -> tuple[dict[str, NodeFile], list[str]]:
        """(node -> its file, problems with whole files); `fingerprint` changes whenever a file
        was added, removed or changed (inode, size or mtime) since the previous read."""
        nodes: dict[str, NodeFile] = {}
        problems: list[str] = []
        seen: set[str] = set()
        paths = sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []
        for path in paths:
            seen.add(path.name)
            try:
                st = path.stat()
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                cached = self._cache.get(path.name)
                if cached is not None and cached[0] == key:
                    node, parsed = cached[1], cached[2]
                else:
                    node, parsed = parse_node_file(path.name, path.read_text())
                    self._cache[path.name] = (key, node, parsed)
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                self._cache.pop(path.name, None)
                problems.append(str(exc) if isinstance(exc, ValueError) else f"{path}: {exc}")
                continue
            nodes[node] = parsed
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        self.fingerprint = tuple(sorted((name, entry[0]) for name, entry in self._cache.items()))
        return nodes, problems


# -- updates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryUpdate:
    """One chunk of the change from version `base` to `version` (`reset`: from nothing)."""

    version: int
    base: int
    reset: bool
    egress: str
    upserts: tuple[DirectoryEntry, ...] = ()
    removals: tuple[str, ...] = ()
    last: bool = True
    rejected: tuple[str, ...] = ()  # entries that failed validation on decoding (not encoded)

    @staticmethod
    def from_json(raw: Any) -> DirectoryUpdate:
        return parse_update(raw)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "base": self.base,
            "reset": self.reset,
            "egress": self.egress,
            "upserts": [e.to_json() for e in self.upserts],
            "removals": list(self.removals),
            "last": self.last,
        }


def parse_update(raw: Any) -> DirectoryUpdate:
    """Decode an update; a malformed envelope raises DirectoryError, a bad entry is skipped and
    listed in `rejected`."""
    if not isinstance(raw, dict):
        raise DirectoryError(f"directory update {raw!r:.80} is not an object")
    try:
        version, base = raw["version"], raw["base"]
        reset, last, egress = raw["reset"], raw["last"], raw["egress"]
        upserts, removals = raw["upserts"], raw["removals"]
    except KeyError as exc:
        raise DirectoryError(f"directory update without {exc.args[0]!r}") from None
    for name, value in (("version", version), ("base", base)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DirectoryError(f"directory update {name} {value!r} is not a count")
    if not isinstance(reset, bool) or not isinstance(last, bool):
        raise DirectoryError("directory update reset and last must be true or false")
    if egress not in EGRESS:
        raise DirectoryError(f"directory egress {egress!r} is not one of {', '.join(EGRESS)}")
    if not isinstance(upserts, list) or not isinstance(removals, list):
        raise DirectoryError("directory update upserts and removals must be lists")
    good: list[DirectoryEntry] = []
    rejected: list[str] = []
    for item in upserts:
        try:
            good.append(parse_entry(item))
        except ValueError as exc:
            rejected.append(str(exc))
    gone: list[str] = []
    for ip in removals:
        try:
            gone.append(str(ipaddress.ip_address(ip)))
        except (TypeError, ValueError):
            rejected.append(f"removal {ip!r} is not an IP address")
    return DirectoryUpdate(
        version, base, reset, egress, tuple(good), tuple(gone), last, tuple(rejected)
    )


def diff(
    old: Mapping[str, DirectoryEntry], new: Mapping[str, DirectoryEntry]
) -> tuple[tuple[DirectoryEntry, ...], tuple[str, ...]]:
    """(entries to upsert, addresses to remove) that turn `old` into `new`."""
    upserts = tuple(e for ip, e in sorted(new.items()) if old.get(ip) != e)
    removals = tuple(sorted(ip for ip in old if ip not in new))
    return upserts, removals


def plan_update(
    version: int,
    base: int,
    egress: str,
    upserts: Iterable[DirectoryEntry],
    removals: Iterable[str],
    *,
    reset: bool,
    max_bytes: int = MAX_CHUNK_BYTES,
) -> list[DirectoryUpdate]:
    """The chunks of one change, each at most `max_bytes` of encoded entries (at least one
    chunk, so an empty change still moves the version)."""
    chunks: list[DirectoryUpdate] = []
    batch: list[DirectoryEntry] = []
    gone: list[str] = []
    size = 0

    def cut() -> None:
        nonlocal size
        chunks.append(DirectoryUpdate(version, base, reset, egress, tuple(batch), tuple(gone),
                                      last=False))  # fmt: skip
        batch.clear()
        gone.clear()
        size = 0

    for item, cost in _sized(upserts, removals):
        if size + cost > max_bytes and (batch or gone):
            cut()
        if isinstance(item, DirectoryEntry):
            batch.append(item)
        else:
            gone.append(item)
        size += cost
    cut()
    final = chunks[-1]
    chunks[-1] = DirectoryUpdate(final.version, final.base, final.reset, final.egress,
                                 final.upserts, final.removals, last=True)  # fmt: skip
    return chunks


def _sized(
    upserts: Iterable[DirectoryEntry], removals: Iterable[str]
) -> Iterator[tuple[DirectoryEntry | str, int]]:
    for entry in upserts:
        # the JSON of an entry: its three strings plus keys and punctuation (42 bytes)
        yield entry, len(entry.ip) + len(entry.identity) + len(entry.node) + 42
    for ip in removals:
        yield ip, len(ip) + 4


@dataclass
class DirectoryTable:
    """The receiving side of updates: the applied directory, O(1) lookups, chunk assembly.

    A proxy worker needs only `identities` (ip -> expected identity, "" to refuse) and sets
    `keep_entries=False`; the supervisor needs only `entries` (to give a new worker the whole
    table) and sets `lookups=False`: each holds one dict of 100,000 entries, not two.  A change
    is applied when its last chunk arrives: a reset builds new dicts and swaps them in, a delta
    updates them in place (O(size of the change)).
    """

    keep_entries: bool = True
    lookups: bool = True
    version: int = 0
    egress: str = "passthrough"
    entries: dict[str, DirectoryEntry] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)  # ip -> identity ("" = refuse)
    rejected: int = 0  # entries skipped by validation, in the updates that built this table
    problems: list[str] = field(default_factory=list)  # the latest reasons
    _pending: list[DirectoryUpdate] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.entries) if self.keep_entries else len(self.identities)

    def receive(self, update: DirectoryUpdate) -> bool:
        """Take one chunk; True when it completed a change (now applied).  DirectoryError if a
        delta chunk does not continue what is pending or the change is not based on this
        version; the pending chunks are dropped then, and the table is unchanged.  A reset chunk
        of another change abandons what is pending and starts over."""
        pending = self._pending
        if pending:
            head = pending[0]
            if (update.version, update.base, update.reset) != (head.version, head.base,
                                                               head.reset):  # fmt: skip
                pending.clear()
                if not update.reset:  # a reset starts over (a sender that reconnected)
                    raise DirectoryError(
                        f"directory chunk of version {update.version} interleaved with "
                        f"version {head.version}"
                    )
        if not update.reset and update.base != self.version:
            pending.clear()
            raise DirectoryError(
                f"directory change {update.base} -> {update.version} does not apply to "
                f"version {self.version}"
            )
        pending.append(update)
        if not update.last:
            return False
        self._apply(pending)
        pending.clear()
        return True

    def _apply(self, chunks: list[DirectoryUpdate]) -> None:
        head = chunks[0]
        entries = {} if head.reset else self.entries
        identities = {} if head.reset else self.identities
        rejected: list[str] = []
        for chunk in chunks:
            for ip in chunk.removals:
                entries.pop(ip, None)
                identities.pop(ip, None)
            if self.keep_entries:
                entries.update((e.ip, e) for e in chunk.upserts)
            if self.lookups:
                identities.update((e.ip, e.identity) for e in chunk.upserts)
            rejected.extend(chunk.rejected)
        self.entries, self.identities = entries, identities
        self.version = head.version
        self.egress = chunks[-1].egress
        self.rejected = (0 if head.reset else self.rejected) + len(rejected)
        if rejected or head.reset:
            self.problems = rejected[:MAX_REPORTED]

    def snapshot(self, max_bytes: int = MAX_CHUNK_BYTES) -> list[DirectoryUpdate]:
        """The whole table as reset chunks (for a new worker or a proxy that fell behind)."""
        if not self.keep_entries:
            raise DirectoryError("this table keeps lookups only; it cannot be sent on")
        return plan_update(self.version, 0, self.egress, self.entries.values(), (),
                           reset=True, max_bytes=max_bytes)  # fmt: skip
