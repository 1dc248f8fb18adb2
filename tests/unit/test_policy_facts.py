"""The facts the engine decides on: request path normalization (Envoy's default, which Istio's
`paths` rely on) and header folding."""

from __future__ import annotations

import pytest

from agent.policy.facts import fold_headers, normalize_path


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?x=1&y=/../z", "/a/b"),  # the query is not part of the path
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../a", "/a"),  # never above the root
        ("/a/..", "/"),
        ("/a/.", "/a/"),
        ("/a\\b\\..\\c", "/a/c"),  # back-slashes are slashes
        ("/%61dmin", "/admin"),  # unreserved characters are decoded
        ("/%7Euser/%2d%5F%2E", "/~user/-_."),
        ("/a/%2e%2E/b", "/b"),  # ... before dot segments are removed
        ("/a%2Fb", "/a%2Fb"),  # %2F and %5C stay encoded (no DECODE_AND_MERGE_SLASHES)
        ("/a%5cb", "/a%5cb"),
        ("/a%20b", "/a%20b"),
        ("/%252e%252e/x", "/%252e%252e/x"),  # decoded once only
        ("/%zz", "/%zz"),
        ("/a//b", "/a//b"),  # slashes are not merged (no MERGE_SLASHES)
        ("/.well-known/x", "/.well-known/x"),
        ("/a/..%2f/b", "/a/..%2f/b"),
        ("/Admin", "/Admin"),  # case is kept
    ],
)
def test_normalize_path(target: str, path: str) -> None:
    assert normalize_path(target) == path


@pytest.mark.parametrize("target", ["/a%00b", "/%00", "a/b", "*", "", "?x"])
def test_normalize_path_refuses(target: str) -> None:
    assert normalize_path(target) is None


@pytest.mark.parametrize("target", ["/%%36%31dmin", "/%%300", "/a/%%32e%%32e/b"])
def test_normalize_path_refuses_what_decoding_makes_an_escape_of(target: str) -> None:
    """A bare "%" before escapes of hex digits would decode to a new escape (`/%61dmin`, found
    by fuzzing): a backend that decodes again would see a path policy never decided on."""
    assert normalize_path(target) is None


def test_fold_headers_lower_cases_and_joins_repeats_in_order() -> None:
    pairs = [("X-A", "1"), ("Host", "h"), ("x-a", "2"), ("X-B", ""), ("x-a", "3")]
    assert fold_headers(pairs) == {"x-a": "1,2,3", "host": "h", "x-b": ""}
