"""A node's file in the shared mesh directory (`agent.directory.parse_node_file`), as every agent
reads every other node's file.

Input: the file.  Contract: `parse_node_file` raises nothing but `ValueError` (a file that is not
UTF-8 is refused before, as `FolderReader` does), what it keeps are entries of that node, and
every entry encodes (`to_json`) to one that parses equal.
"""

from __future__ import annotations

import json

from agent.directory import DirectoryEntry, parse_entry, parse_node_file
from fuzz.harness import main


def check(data: bytes) -> None:
    try:
        node, parsed = parse_node_file("node-a.json", data.decode())
    except ValueError:  # UnicodeDecodeError included
        return
    assert node == "node-a"
    for entry in parsed.entries:
        assert entry.node == node and parse_entry(entry.to_json()) == entry, entry


def seeds() -> dict[str, bytes]:
    entries = [
        DirectoryEntry("10.1.0.2", "spiffe://cluster.local/ns/shop/sa/web", "node-a"),
        DirectoryEntry("fd00::2", "spiffe://cluster.local/ns/shop/sa/web", "node-a"),
    ]
    good = {"node": "node-a", "entries": [e.to_json() for e in entries]}
    bad = [
        {"ip": "10.1.0.x", "identity": "", "node": "node-a"},
        {"ip": "10.1.0.3", "identity": "spiffe://evil", "node": "node-a"},
        {"ip": "0:0::FFFF:10.0.0.1", "identity": "x", "node": "node-b"},
        "entry",
        7,
    ]
    return {
        "published": json.dumps(good, indent=1).encode(),
        "bad-entries": json.dumps({**good, "entries": bad}).encode(),
        "other-node": json.dumps({**good, "node": "node-b"}).encode(),
        "no-entries": b'{"node": "node-a"}',
    }


if __name__ == "__main__":
    main(check)
