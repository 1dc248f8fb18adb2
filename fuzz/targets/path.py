"""Path normalization for policy (`agent.policy.facts.normalize_path`): the request target of
every inspected request, HTTP/1.1 and HTTP/2.

Input: the target (latin-1, as the inspectors decode it).  Contract: `normalize_path` raises
nothing; a path it returns is absolute, holds no dot segment, no query and no `%00`, and is
its own normalization: policy decides on it and the proxy forwards it, so a server that
normalizes again must find the path policy saw.
"""

from __future__ import annotations

from agent.policy.facts import normalize_path
from fuzz.harness import main


def check(data: bytes) -> None:
    path = normalize_path(data.decode("latin-1"))
    if path is None:
        return
    assert path.startswith("/") and "?" not in path and "%00" not in path, path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments, path
    assert normalize_path(path) == path, path


def seeds() -> dict[str, bytes]:
    return {
        "plain": b"/api/items",
        "query": b"/api/items?id=1&x=/../y",
        "dots": b"/a/./b/../c/",
        "escaped-dots": b"/a/%2e%2E/b/%2e",
        "unreserved": b"/%41%7e%5F%2d",
        "reserved": b"/a%2Fb%5c%20",
        "backslash": b"\\a\\..\\b",
        "nul": b"/a%00b",
        "relative": b"a/b",
        "above-root": b"/../../x",
    }


if __name__ == "__main__":
    main(check)
