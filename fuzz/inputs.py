"""How a target cuts one fuzz input into several (pure; shared by seeds and checks).

A fuzzer hands a target one byte string; a stream parser wants the reads as they came (one
after another, often alternating between two peers), and some targets want an options byte.
`SEP` marks where one read ends: mutations that break it merge two reads, which is an input
too.  Parsers that read a file get it through `scratch_file`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

SEP = b"\n\x00\xfe\x00\n"


def reads(data: bytes) -> list[bytes]:
    """The reads of an input (at least one, possibly empty)."""
    return data.split(SEP)


def join(parts: list[bytes]) -> bytes:
    """An input made of these reads (the inverse of `reads`)."""
    return SEP.join(parts)


def options(data: bytes) -> tuple[int, bytes]:
    """(the first byte as option bits, the rest); 0 and b"" for an empty input."""
    return (data[0], data[1:]) if data else (0, b"")


def scratch_file(name: str) -> Path:
    """A file in a private directory, for parsers that read a path; the directory goes when
    the process exits."""
    memory = Path("/dev/shm")  # no disk writes per input
    folder = Path(tempfile.mkdtemp(prefix="ferry-fuzz-", dir=memory if memory.is_dir() else None))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / name
