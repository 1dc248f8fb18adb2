"""What the fuzz tests share: byte mutations of a target's corpus, structured values, settings.

`mutants(seeds)` takes a seed and applies one to four mutations of the kinds libFuzzer uses
(flip a bit, set a byte, insert or delete bytes, repeat a run of bytes, splice in another
seed's tail, insert a token that parsers give meaning to, open thousands of brackets: JSON and
YAML nested deeper than Python's recursion limit), so Hypothesis starts from valid inputs and
shrinks a failure to a small one.  `json_values` are hostile values for fields of decoded
documents (NaN and infinities included), `cut` cuts bytes into reads.
"""

from __future__ import annotations

import importlib
import itertools
from datetime import timedelta
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fuzz.inputs import SEP

CORPUS = Path(__file__).parents[2] / "fuzz" / "corpus"
MAX_INPUT = 64 * 1024
TOKENS = (
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b" ",
    b"%",
    b"%00",
    b"%2e",
    b"/..",
    b"\\",
    b"?",
    b"#",
    b"\x00",
    b"\xff",
    b"\x80",
    b"\xc3",
    b"[",
    b"{",
    b'"',
    b"\\u0000",
    b"\\ud800",
    b"NaN",
    b"1e999",
    b"-1",
    b"0",
    b"true",
    b"null",
    b"&a ",
    b"*a",
    b": ",
    b"- ",
    b"---\n",
    b"!!python",
    b"\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x7f\xff\xff\xff",
    b"\x00\x00\x04",
    SEP,
)
# A wall-clock bound on one input (a hang is a finding); the first call of a target is made
# before Hypothesis runs (`warm`), so imports and caches do not count.
FUZZ = settings(
    max_examples=50,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def target(name: str) -> ModuleType:
    """The fuzz target `fuzz.targets.<name>`."""
    return importlib.import_module(f"fuzz.targets.{name}")


def corpus(name: str) -> list[bytes]:
    """The kept corpus of a target: its seeds and regression inputs."""
    return [path.read_bytes() for path in sorted((CORPUS / name).iterdir())]


@st.composite
def mutants(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                ("flip", "set", "insert", "delete", "repeat", "splice", "token", "nest")
            )
        )
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "repeat":
            run = data[at : at + draw(st.integers(1, 8))]
            data[at:at] = run * draw(st.sampled_from((2, 10, 100, 3000)))
        elif kind == "splice":
            other = draw(st.sampled_from(seeds))
            data[at:] = other[draw(st.integers(0, len(other))) :]
        elif kind == "token":
            data[at:at] = draw(st.sampled_from(TOKENS))
        else:
            data[at:at] = draw(st.sampled_from((b"[", b'{"a":', b"- ", b"a:\n "))) * 3000
        del data[MAX_INPUT:]
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def cut(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut into reads at a few places (empty reads included)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
