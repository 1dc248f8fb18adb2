"""The enrollment store (`agent.workloads.EnrollmentStore`): `enrollments.json` in the state
directory, read at every agent start.

Input: the file.  Contract: `load` raises nothing but `EnrollmentError` (`StoreError` among
them), and what it loads saves to a file that loads equal.
"""

from __future__ import annotations

import json

from agent.workloads import STORE_VERSION, EnrollmentError, EnrollmentStore, Workload
from fuzz.harness import main
from fuzz.inputs import scratch_file
from fuzz.targets.control import WEB

STORE = EnrollmentStore(scratch_file("state"))


def check(data: bytes) -> None:
    STORE.path.parent.mkdir(exist_ok=True)
    STORE.path.write_bytes(data)
    try:
        loaded = STORE.load()
    except EnrollmentError:
        return
    STORE.save(loaded)
    assert STORE.load() == loaded, loaded


def seeds() -> dict[str, bytes]:
    db = Workload("netns-4-8", "db", "/proc/1/ns/net", 8, "shop", "db")
    version_2 = {"version": STORE_VERSION, "workloads": [WEB.to_json(), db.to_json()]}
    version_1 = {"version": 1, "workloads": [db.to_json()]}
    return {
        "version-2": json.dumps(version_2, indent=2).encode(),
        "version-1": json.dumps(version_1).encode(),
        "empty": b'{"version": 2, "workloads": []}',
        "unknown-version": b'{"version": 3}',
        "bad-mode": json.dumps(version_2).replace('"strict"', '"open"').encode(),
        "truncated": json.dumps(version_2).encode()[:40],
    }


if __name__ == "__main__":
    main(check)
