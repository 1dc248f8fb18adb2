"""How long a mesh directory of 1k, 10k and 100k entries takes to reach every proxy worker.

The bench builds a throwaway node (`bench.cli_latency.throwaway_node`: a network namespace with a
real `agent run` and `agent proxy --workers 2`, state and config in a temporary directory) whose
`mesh.directory` is a temporary folder.  For each size it writes another node's file of that many
entries into the folder (atomically, as an agent publishes) and measures:

- end to end: from the file's rename until every worker reports the new directory version with
  all entries (`agent proxy` status, `applied`), which includes the agent's folder poll (1 s);
- agent -> workers: what the agent logs for sending that version to the proxy ("reached N
  proxy(ies) in X ms"): chunking, the supervisor's forwarding, every worker's apply and ack;
- then one entry changed in the same directory (a delta of one chunk), agent -> workers;
- the proxy's RSS (supervisor and workers, summed) and the agent's RSS with that directory.

No workload is enrolled and no traffic is sent.  Everything is removed on exit, also on failure.

    sudo .venv/bin/python -m bench.directory [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from agent.admin import request
from bench.cli_latency import BenchError, Node, throwaway_node

PEER = "bench-peer"
TIMEOUT = 120.0
SENT = re.compile(
    r"directory version (\d+) \((\d+) entries.*reached \d+ proxy\(ies\) in ([\d.]+) ms"
)


def write_peer(folder: Path, count: int, salt: int = 0) -> None:
    """Another node's file of `count` entries, renamed into place as an agent publishes it."""
    entries = [
        {
            "ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            "identity": f"spiffe://cluster.local/ns/ns-{i % 100}/sa/sa-{i + salt}",
            "node": PEER,
        }
        for i in range(count)
    ]
    tmp = folder / f".{PEER}.json.tmp"
    tmp.write_text(json.dumps({"node": PEER, "entries": entries}))
    os.replace(tmp, folder / f"{PEER}.json")


def applied(node: Node) -> list[tuple[int, int]]:
    doc = request(node.state_dir / "proxy.sock", {"op": "status"}, timeout=30)
    return [(a["directory_version"], a["directory_entries"]) for a in doc.get("applied", [])]


def wait_applied(node: Node, entries: int, after: int) -> int:
    """Until every worker holds a version newer than `after` with `entries` entries."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        now = applied(node)
        if now and all(v > after and n == entries for v, n in now):
            return now[0][0]
        time.sleep(0.02)
    raise BenchError(f"the directory of {entries} entries did not reach every worker: {now}")


def sent_ms(node: Node, version: int) -> float:
    """What the agent logged for sending `version` (the log line follows the last ack)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for match in SENT.finditer((node.logs / "run.log").read_text()):
            if int(match.group(1)) == version:
                return float(match.group(3))
        time.sleep(0.05)
    raise BenchError(f"the agent did not log sending directory version {version}")


def rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    total: int = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    return total / 2**20


def measure(node: Node, folder: Path, sizes: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    version = max((v for v, _n in applied(node)), default=0)
    for size in sizes:
        started = time.monotonic()
        write_peer(folder, size)
        version = wait_applied(node, size, version)
        end_to_end = (time.monotonic() - started) * 1e3
        full = sent_ms(node, version)
        write_peer(folder, size, salt=1)  # every identity changes: the worst delta
        version = wait_applied(node, size, version)
        changed_all = sent_ms(node, version)
        rows.append({
            "entries": size, "end_to_end_ms": end_to_end, "agent_to_workers_ms": full,
            "all_changed_ms": changed_all,
            "proxy_rss_mb": rss_mb(node.processes[1].pid),
            "agent_rss_mb": rss_mb(node.processes[0].pid),
        })  # fmt: skip
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "mesh directory to every proxy worker (2 workers), one node, no traffic",
        "",
        "| entries | end to end ms | agent -> workers ms | every entry changed ms "
        "| proxy RSS MB | agent RSS MB |",
        "|--------:|--------------:|--------------------:|-----------------------:"
        "|-------------:|-------------:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['entries']:>7} | {r['end_to_end_ms']:>13.0f} "
            f"| {r['agent_to_workers_ms']:>19.0f} | {r['all_changed_ms']:>22.0f} "
            f"| {r['proxy_rss_mb']:>12.1f} | {r['agent_rss_mb']:>12.1f} |"
        )
    lines += ["", "end to end includes the agent's folder poll (once a second)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,10000,100000", help="directory sizes")
    args: Any = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r} is not a comma-separated list of counts")
    if any(not 0 < s <= 1 << 22 for s in sizes):
        parser.error(f"--sizes {args.sizes!r}: each size must be 1..4194304")
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ferry-bench-directory-") as tmp:
        folder = Path(tmp)
        try:
            with throwaway_node(0, {"mesh": {"directory": str(folder)}}, workers=2) as node:
                rows = measure(node, folder, sizes)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
