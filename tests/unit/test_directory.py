"""The mesh directory: per-entry validation, chunked versioned updates, the receiving table and
the folder reader."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.directory import (
    MAX_CHUNK_BYTES,
    DirectoryEntry,
    DirectoryError,
    DirectoryTable,
    FolderReader,
    diff,
    parse_entry,
    parse_node_file,
    parse_update,
    plan_update,
    publish,
)


def entry(i: int, node: str = "node-a") -> DirectoryEntry:
    return DirectoryEntry(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                          f"spiffe://cluster.local/ns/ns-{i % 97}/sa/sa-{i}", node)  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"ip": "10.0.0.1", "identity": "spiffe://td/ns/a/sa/b", "node": "n1"},
         DirectoryEntry("10.0.0.1", "spiffe://td/ns/a/sa/b", "n1")),
        ({"ip": "fd00:0::1", "identity": "spiffe://td/ns/a/sa/b", "node": "n1"},
         DirectoryEntry("fd00::1", "spiffe://td/ns/a/sa/b", "n1")),
        # a valid address with an invalid identity stays, with no identity: refused, not plaintext
        ({"ip": "10.0.0.1", "identity": "spiffe://td/ns/A/sa/b", "node": "n1"},
         DirectoryEntry("10.0.0.1", "", "n1")),
        ({"ip": "10.0.0.1", "identity": 7, "node": "n1"}, DirectoryEntry("10.0.0.1", "", "n1")),
    ],
)  # fmt: skip
def test_parse_entry(raw: object, expected: DirectoryEntry) -> None:
    assert parse_entry(raw) == expected


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("10.0.0.1", "is not an object"),
        ({"ip": "10.0.0.300", "identity": "spiffe://td/ns/a/sa/b", "node": "n1"},
         "'10.0.0.300' is not an IP address"),
        ({"ip": None, "identity": "spiffe://td/ns/a/sa/b", "node": "n1"}, "ip must be a string"),
        ({"ip": "10.0.0.1", "identity": "spiffe://td/ns/a/sa/b", "node": "../x"},
         "node '../x' is not a DNS name"),
        ({"ip": "10.0.0.1", "identity": "spiffe://td/ns/a/sa/b", "node": ["n1"]},
         "is not a string"),
    ],
)  # fmt: skip
def test_parse_entry_refuses(raw: object, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_entry(raw)
    assert needle in str(err.value)


def test_a_change_is_cut_into_chunks_that_fit_a_datagram() -> None:
    entries = [entry(i) for i in range(10_000)]
    chunks = plan_update(3, 0, "passthrough", entries, (), reset=True)
    assert len(chunks) > 10
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for chunk in chunks:
        encoded = json.dumps(chunk.to_json(), separators=(",", ":")).encode()
        assert len(encoded) <= MAX_CHUNK_BYTES + 200
    assert [e for c in chunks for e in c.upserts] == entries


def test_an_empty_change_still_moves_the_version() -> None:
    table = DirectoryTable()
    (only,) = plan_update(1, 0, "refuse", (), (), reset=True)
    assert table.receive(only) and table.version == 1 and table.egress == "refuse"


def test_table_applies_a_change_only_when_its_last_chunk_arrives() -> None:
    table = DirectoryTable()
    first = plan_update(1, 0, "passthrough", [entry(i) for i in range(3000)], (), reset=True)
    for chunk in first[:-1]:
        assert not table.receive(chunk)
        assert table.version == 0 and not table.identities
    assert table.receive(first[-1])
    assert table.version == 1 and len(table.identities) == 3000
    old = dict(table.entries)
    new = {e.ip: e for e in [*[entry(i) for i in range(5, 3000)], entry(4000)]}
    new[entry(7).ip] = DirectoryEntry(entry(7).ip, "spiffe://cluster.local/ns/x/sa/y", "node-a")
    upserts, removals = diff(old, new)
    assert len(upserts) == 2 and len(removals) == 5
    for chunk in plan_update(2, 1, "refuse", upserts, removals, reset=False, max_bytes=100):
        table.receive(chunk)
    assert table.version == 2 and table.egress == "refuse"
    assert table.entries == new
    assert table.identities[entry(7).ip] == "spiffe://cluster.local/ns/x/sa/y"


def test_table_refuses_a_change_that_does_not_follow_its_version() -> None:
    table = DirectoryTable()
    for chunk in plan_update(1, 0, "passthrough", [entry(1)], (), reset=True):
        table.receive(chunk)
    (skipping,) = plan_update(3, 2, "passthrough", [entry(2)], (), reset=False)
    with pytest.raises(DirectoryError, match="2 -> 3 does not apply to version 1"):
        table.receive(skipping)
    assert table.version == 1 and list(table.identities) == [entry(1).ip]


def test_table_refuses_interleaved_deltas_and_keeps_what_it_had() -> None:
    table = DirectoryTable()
    for chunk in plan_update(1, 0, "passthrough", [entry(1)], (), reset=True):
        table.receive(chunk)
    a = plan_update(2, 1, "passthrough", [entry(i) for i in range(2000)], (), reset=False)
    b = plan_update(3, 1, "passthrough", [entry(i) for i in range(2000)], (), reset=False)
    table.receive(a[0])
    with pytest.raises(DirectoryError, match="interleaved"):
        table.receive(b[1])
    assert table.version == 1 and list(table.identities) == [entry(1).ip]


def test_a_reset_abandons_a_half_received_change() -> None:
    """A sender that reconnects mid-change starts over with a reset: no error, nothing mixed."""
    table = DirectoryTable()
    a = plan_update(1, 0, "passthrough", [entry(i) for i in range(2000)], (), reset=True)
    b = plan_update(2, 0, "passthrough", [entry(i) for i in range(5, 1000)], (), reset=True)
    table.receive(a[0])
    for chunk in b:
        table.receive(chunk)
    assert table.version == 2 and len(table.identities) == 995


def test_a_bad_entry_is_skipped_and_reported_never_the_whole_update() -> None:
    raw = plan_update(1, 0, "passthrough", [entry(1), entry(2)], (), reset=True)[0].to_json()
    raw["upserts"].insert(1, {"ip": "not-an-ip", "identity": "x", "node": "n"})
    raw["removals"].append("10.0.0.999")
    update = parse_update(raw)
    assert [e.ip for e in update.upserts] == [entry(1).ip, entry(2).ip]
    assert len(update.rejected) == 2 and "'not-an-ip' is not an IP address" in update.rejected[0]
    table = DirectoryTable()
    table.receive(update)
    assert len(table.identities) == 2 and table.rejected == 2
    assert table.problems == list(update.rejected)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"version": -1}, "version -1 is not a count"),
        ({"egress": "open"}, "egress 'open' is not one of"),
        ({"upserts": {}}, "must be lists"),
        ({"last": "yes"}, "must be true or false"),
    ],
)
def test_a_malformed_envelope_is_an_error(change: dict[str, object], needle: str) -> None:
    raw = {**plan_update(1, 0, "passthrough", (), (), reset=True)[0].to_json(), **change}
    with pytest.raises(DirectoryError, match=needle):
        parse_update(raw)


def test_snapshot_rebuilds_the_same_table() -> None:
    table = DirectoryTable()
    for chunk in plan_update(5, 0, "refuse", [entry(i) for i in range(1500)], (), reset=True):
        table.receive(chunk)
    copy = DirectoryTable()
    for chunk in table.snapshot():
        copy.receive(chunk)
    assert (copy.version, copy.egress, copy.entries) == (5, "refuse", table.entries)


def test_node_file_skips_bad_entries_and_names_them() -> None:
    body = {"node": "node-b", "entries": [
        entry(1, "node-b").to_json(),
        {"ip": "10.0.0.1", "identity": "spiffe://td/ns/a/sa/b", "node": "node-c"},
        {"ip": "bogus", "identity": "spiffe://td/ns/a/sa/b", "node": "node-b"},
        {"ip": "10.0.0.2", "identity": "http://evil", "node": "node-b"},
    ]}  # fmt: skip
    node, parsed = parse_node_file("node-b.json", json.dumps(body))
    assert node == "node-b"
    assert [e.ip for e in parsed.entries] == [entry(1).ip, "10.0.0.2"]
    assert parsed.entries[1].identity == ""  # refused, not plaintext
    assert parsed.skipped == 2
    assert any("node 'node-c' is not 'node-b'" in p for p in parsed.problems)
    assert any("'bogus' is not an IP address" in p for p in parsed.problems)
    assert any("'http://evil' is not a SPIFFE ID" in p for p in parsed.problems)


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("a.json", "{", "not JSON"),
        ("a.json", "[]", "expected an object"),
        ("a.json", '{"node": "b", "entries": []}', "does not match the file name"),
    ],
)
def test_unusable_node_files_are_reported(name: str, text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_node_file(name, text)


def test_folder_reader_rereads_only_changed_files(tmp_path: Path) -> None:
    publish(tmp_path, "node-a", [entry(1)])
    publish(tmp_path, "node-b", [entry(2, "node-b")])
    (tmp_path / "node-c.json").write_text("{broken")
    reader = FolderReader(tmp_path)
    nodes, problems = reader.read()
    assert sorted(nodes) == ["node-a", "node-b"]
    assert len(problems) == 1 and "node-c.json" in problems[0]
    first = nodes["node-a"]
    nodes, _ = reader.read()
    assert nodes["node-a"] is first  # unchanged file: not parsed again
    publish(tmp_path, "node-a", [entry(1), entry(3)])
    nodes, _ = reader.read()
    assert len(nodes["node-a"].entries) == 2
    os.unlink(tmp_path / "node-b.json")
    nodes, _ = reader.read()
    assert sorted(nodes) == ["node-a"]


def test_publish_refuses_a_node_name_that_is_a_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.\./x' is not a DNS name"):
        publish(tmp_path / "dir", "../x", [])
    assert not (tmp_path / "x.json").exists()
