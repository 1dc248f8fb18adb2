"""The shared-memory bucket table (agent.proxy.ratelimit_store) in one process: same answers as
the pure arithmetic, the set-associative table's eviction rule, and what `attach` refuses.
Several processes on one table: tests/integration/test_ratelimit_store.py."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy.ratelimit_store import (
    HEADER_SIZE,
    MAGIC,
    SET_SIZE,
    BucketTableError,
    SharedBuckets,
)
from tests.unit.test_ratelimit import MemoryBuckets

HOUR = 3600.0


@pytest.fixture
def table() -> Iterator[tuple[SharedBuckets, int]]:
    store, fd = SharedBuckets.create(64)
    yield store, fd
    store.close()
    os.close(fd)


def test_attached_processes_see_one_table(table: tuple[SharedBuckets, int]) -> None:
    store, fd = table
    other = SharedBuckets.attach(fd)
    try:
        assert store.take(b"k", 2, 1, HOUR, 5.0) == (True, 1, HOUR)
        assert other.take(b"k", 2, 1, HOUR, 5.0) == (True, 0, HOUR)
        assert store.take(b"k", 2, 1, HOUR, 5.0)[0] is False
        assert other.slots == 64 and other.stats() == (1, 0)
    finally:
        other.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 400_000_000)), max_size=80),
       st.integers(1, 4), st.sampled_from([0.05, 0.1, 1.0, 2.5]))  # fmt: skip
def test_same_answers_as_the_pure_arithmetic(
    takes: list[tuple[int, int]], per_fill: int, interval: float
) -> None:
    store, fd = SharedBuckets.create(8)  # one set: every key in the same 8 ways
    try:
        memory, now = MemoryBuckets(), 1000.0
        for key, step_ns in takes:
            now += step_ns / 1e9
            name = b"key-%d" % key
            expected = memory.take(name, 3, per_fill, interval, now)
            assert store.take(name, 3, per_fill, interval, now) == expected
    finally:
        store.close()
        os.close(fd)


def test_a_full_set_reuses_a_refilled_bucket_before_evicting_a_live_one() -> None:
    store, fd = SharedBuckets.create(8)  # one set of 8 ways
    try:
        store.take(b"quick", 1, 1, 0.05, 0.0)  # full again at 0.05 s
        for i in range(7):
            store.take(b"slow-%d" % i, 1, 1, HOUR, 0.0)  # drained for an hour
        assert store.stats() == (8, 0)
        assert store.take(b"new-1", 1, 1, HOUR, 1.0)[0]  # takes quick's way: lossless
        assert store.stats() == (8, 0)
        assert store.take(b"quick", 1, 1, 0.05, 1.0)[0]  # quick starts over full: nothing lost
        assert store.stats() == (8, 1)  # ... but it evicted a live bucket: slow-0 (soonest full)
        assert store.take(b"slow-1", 1, 1, HOUR, 2.0)[0] is False  # the others kept their state
        assert store.take(b"slow-0", 1, 1, HOUR, 2.0)[0] is True  # the evicted one starts full
    finally:
        store.close()
        os.close(fd)


def test_distinct_keys_do_not_share_a_bucket(table: tuple[SharedBuckets, int]) -> None:
    store, _ = table
    results = [store.take(b"client-%d" % i, 1, 1, HOUR, 0.0)[0] for i in range(40)]
    assert results == [True] * 40
    assert store.take(b"client-7", 1, 1, HOUR, 0.0)[0] is False


@pytest.mark.parametrize("slots", [0, 4, 12, 100])
def test_table_sizes_are_powers_of_two(slots: int) -> None:
    with pytest.raises(BucketTableError, match=f"slots must be a power of two >= 8, got {slots}"):
        SharedBuckets.create(slots)


def test_attach_refuses_what_is_not_a_sealed_table() -> None:
    read, write = os.pipe()
    try:
        with pytest.raises(BucketTableError, match=f"fd {read} is not a sealed memfd"):
            SharedBuckets.attach(read)
    finally:
        os.close(read)
        os.close(write)
    plain = os.memfd_create("plain", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(plain, HEADER_SIZE + SET_SIZE)
        with pytest.raises(BucketTableError, match=f"fd {plain} is not sealed against resizing"):
            SharedBuckets.attach(plain)
    finally:
        os.close(plain)


def test_a_table_written_by_something_else_is_refused() -> None:
    with mmap.mmap(-1, HEADER_SIZE + SET_SIZE) as region:
        region[:8] = b"NOTFERRY"
        with pytest.raises(BucketTableError, match=r"not a Ferry bucket table \(magic b'NOTFERRY'"):
            SharedBuckets(region)
    with mmap.mmap(-1, HEADER_SIZE + 2 * SET_SIZE) as region:
        struct.pack_into("<8sIII", region, 0, MAGIC, 8, 1, SET_SIZE)
        with pytest.raises(BucketTableError, match="bucket table of 896 bytes for 1 sets"):
            SharedBuckets(region)
