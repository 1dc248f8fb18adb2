"""A `policy check` request on the agent's admin socket (`agent.policy_check.CheckRequest`),
one JSON line from `agent policy check` or anyone who can reach agent.sock.

Input: the line.  Contract: `CheckRequest.from_json` raises nothing but `CheckError` (a
`ValueError`, which the admin server answers as a refusal) for any JSON object.
"""

from __future__ import annotations

import contextlib
import json

from agent.policy_check import CheckRequest
from fuzz.harness import main


def check(data: bytes) -> None:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # the admin server answers these (and any other) too
        return
    if isinstance(body, dict):
        with contextlib.suppress(ValueError):
            CheckRequest.from_json(body)


def seeds() -> dict[str, bytes]:
    request = {
        "op": "policy_check",
        "netns": "web",
        "port": 8080,
        "from_principal": "cluster.local/ns/shop/sa/frontend",
        "from_ip": "10.1.0.9",
        "method": "GET",
        "path": "/api/x",
        "host": "web",
        "headers": {"x-team": "blue"},
        "jwt": "a.b.c",
    }
    return {
        "http": json.dumps(request).encode(),
        "l4": b'{"op": "policy_check", "netns": "web", "port": 80, "from_ip": "fd00::1"}',
        "bad-port": b'{"op": "policy_check", "port": true, "from_ip": "10.0.0.1"}',
        "bad-headers": json.dumps({**request, "headers": {"": 1}}).encode(),
    }


if __name__ == "__main__":
    main(check)
