"""Buckets shared by real processes: the node's shared memory and Redis.

Worker processes are started as the proxy supervisor starts its workers: a fresh interpreter
given one end of a socketpair, over which the memfd arrives with SCM_RIGHTS; each attaches the
table, waits for "go" so all of them hammer at once, and reports how many takes were admitted.

Exactness with shared memory uses a synthetic clock so the number of refills is known: every
process walks the same timestamps (1024 s + i x 2**-9 s, exact in binary), the bucket refills one
token per step (tokensPerFill 32 every 62.5 ms), and every process asks for more than that.  After
they finish the test drains what is left at the last timestamp, so the admitted total must be
maxTokens + steps - 1, exactly: a lost update (two workers taking the same token) would admit
more, a lost refill fewer.  Redis uses its own clock, so its exactness test uses a bucket that
refills one token an hour: the admitted total must be maxTokens.

redis-server (Debian package redis-server) is started by the `redis` fixture (conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.proxy.ratelimit_redis import KEY_PREFIX, RedisBuckets
from agent.proxy.ratelimit_store import HEADER_SIZE, SET_SIZE, SharedBuckets

REPO = Path(__file__).resolve().parents[2]
T0, STEP = 1024.0, 2.0**-9  # the synthetic clock: exact binary fractions of a second
HOUR = 3600.0
MAX_TOKENS, PER_FILL, INTERVAL = 200, 32, 0.0625  # the shared bucket: one token per STEP
SHARED = {"key": "shared", "max": MAX_TOKENS, "per_fill": PER_FILL, "interval": INTERVAL}
OWN_MAX = 50
OWN = {"max": OWN_MAX, "per_fill": 1, "interval": HOUR}  # each process' own key: no refill here

# The worker side: attach the table (fd over SCM_RIGHTS) or Redis, wait for "go", hammer.
CHILD = r"""
import json, os, socket, sys
from agent.proxy.ratelimit_store import SharedBuckets
from agent.proxy.ratelimit_redis import RedisBuckets
spec = json.loads(sys.argv[2])
channel = socket.socket(fileno=int(sys.argv[1]))
_, fds, _, _ = socket.recv_fds(channel, 16, 1)
local = SharedBuckets.attach(fds[0])
os.close(fds[0])
store = RedisBuckets(spec["redis"], fallback=local, timeout=5.0) if spec.get("redis") else local
shared, own = spec["shared"], spec["own"]
channel.sendall(b"r")
assert channel.recv(1) == b"g"
admitted = {"shared": 0, "own": 0}
for step in range(spec["steps"]):
    now = spec["t0"] + step * spec["step"]
    for _ in range(spec["per_step"]):
        admitted["shared"] += store.take(shared["key"].encode(), shared["max"], shared["per_fill"],
                                         shared["interval"], now)[0]
    admitted["own"] += store.take(spec["own_key"].encode(), own["max"], own["per_fill"],
                                  own["interval"], now)[0]
channel.sendall(json.dumps(admitted).encode())
"""


def hammer(fd: int, processes: int, spec: dict[str, object]) -> list[dict[str, int]]:
    """Run `processes` workers on the table `fd` at once; their admitted counts."""
    children = []
    try:
        for index in range(processes):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            args = json.dumps({**spec, "own_key": f"own-{index}"})
            process = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(theirs.fileno()), args],
                pass_fds=[theirs.fileno()], cwd=REPO,
            )  # fmt: skip
            theirs.close()
            socket.send_fds(ours, [b"fd"], [fd])
            children.append((process, ours))
        for _, channel in children:
            channel.settimeout(60)
            assert channel.recv(1) == b"r"
        for _, channel in children:
            channel.sendall(b"g")
        results = [json.loads(channel.recv(4096)) for _, channel in children]
        for process, _ in children:
            assert process.wait(60) == 0
        return results
    finally:
        for process, channel in children:
            channel.close()
            if process.poll() is None:
                process.kill()
                process.wait()


def drain(store: SharedBuckets | RedisBuckets, key: bytes, max_tokens: int, per_fill: int,
          interval: float, now: float) -> int:  # fmt: skip
    admitted = 0
    while store.take(key, max_tokens, per_fill, interval, now)[0]:
        admitted += 1
    return admitted


@pytest.fixture
def table() -> Iterator[tuple[SharedBuckets, int]]:
    store, fd = SharedBuckets.create(64)
    yield store, fd
    store.close()
    os.close(fd)


@pytest.mark.parametrize("processes", [2, 4])
def test_shared_memory_admits_exactly_max_tokens_plus_refills(
    table: tuple[SharedBuckets, int], processes: int
) -> None:
    store, fd = table
    steps, per_step = 300, 3
    spec = {"shared": SHARED, "own": OWN, "t0": T0, "step": STEP, "steps": steps,
            "per_step": per_step}  # fmt: skip
    results = hammer(fd, processes, spec)
    last = T0 + (steps - 1) * STEP
    leftover = drain(store, b"shared", MAX_TOKENS, PER_FILL, INTERVAL, last)
    admitted = sum(r["shared"] for r in results) + leftover
    assert admitted == MAX_TOKENS + steps - 1
    assert sum(r["shared"] for r in results) < processes * steps * per_step  # there was contention
    assert [r["own"] for r in results] == [OWN_MAX] * processes  # other keys: untouched


def test_a_worker_that_dies_holding_a_lock_does_not_wedge_the_others(
    table: tuple[SharedBuckets, int],
) -> None:
    store, fd = table
    holder = (
        "import os, sys\n"
        "from agent.proxy.ratelimit_store import SharedBuckets\n"
        "store = SharedBuckets.attach(int(sys.argv[1]))\n"
        f"for at in range({HEADER_SIZE}, {HEADER_SIZE + 8 * SET_SIZE}, {SET_SIZE}):\n"
        "    store._lock(at)  # every set's mutex, then die without unlocking\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", holder, str(fd)], pass_fds=[fd], cwd=REPO, check=True,
                   timeout=60)  # fmt: skip
    taker = (
        "import sys\n"
        "from agent.proxy.ratelimit_store import SharedBuckets\n"
        "store = SharedBuckets.attach(int(sys.argv[1]))\n"
        "print([store.take(b'k%d' % i, 1, 1, 1.0, 0.0)[0] for i in range(40)].count(True))\n"
    )
    done = subprocess.run([sys.executable, "-c", taker, str(fd)], pass_fds=[fd], cwd=REPO,
                          check=True, timeout=60, capture_output=True, text=True)  # fmt: skip
    assert done.stdout.strip() == "40"
    assert store.take(b"k1", 1, 1, 1.0, 0.0)[0] is False  # the table still works, state kept


# --------------------------------------------------------------------------------- Redis
@pytest.fixture
def redis_buckets(redis: str, table: tuple[SharedBuckets, int]) -> Iterator[RedisBuckets]:
    store = RedisBuckets(redis, fallback=table[0], timeout=5.0)
    yield store
    store.close()


def test_redis_bucket_values(redis_buckets: RedisBuckets) -> None:
    got = [redis_buckets.take(b"k", 3, 1, HOUR, 0.0) for _ in range(4)]
    assert [g[:2] for g in got] == [(True, 2), (True, 1), (True, 0), (False, 0)]
    assert got[0][2] == HOUR  # a whole token short: one fill interval
    assert HOUR - 5 < got[3][2] <= HOUR
    assert redis_buckets.take(b"k2", 10, 5, 1.0, 0.0) == (True, 9, 0.2)
    assert (redis_buckets.failures, redis_buckets.fallbacks) == (0, 0)


def test_redis_keys_expire_once_full_again(redis: str, redis_buckets: RedisBuckets) -> None:
    redis_buckets.take(b"short", 1, 1, 0.05, 0.0)
    ttl = redis_buckets._command(b"PTTL", KEY_PREFIX + b"short")
    assert isinstance(ttl, int) and 1000 <= ttl <= 1050  # full again in 50 ms, plus 1 s
    time.sleep(0.06)
    assert redis_buckets.take(b"short", 1, 1, 0.05, 0.0)[:2] == (True, 0)  # refilled


def test_redis_reloads_a_flushed_script(redis_buckets: RedisBuckets) -> None:
    redis_buckets.take(b"k", 3, 1, HOUR, 0.0)
    assert redis_buckets._command(b"SCRIPT", b"FLUSH") == b"OK"
    assert redis_buckets.take(b"k", 3, 1, HOUR, 0.0)[:2] == (True, 1)
    assert redis_buckets.failures == 0


def test_redis_is_exact_across_two_processes(redis: str, table: tuple[SharedBuckets, int]) -> None:
    store, fd = table
    shared = {"key": "global", "max": 300, "per_fill": 1, "interval": HOUR}
    spec = {"redis": redis, "shared": shared, "own": OWN, "t0": 0.0, "step": 0.0, "steps": 200,
            "per_step": 2}  # fmt: skip
    results = hammer(fd, 2, spec)
    check = RedisBuckets(redis, fallback=store, timeout=5.0)
    try:
        leftover = drain(check, b"global", 300, 1, HOUR, 0.0)
    finally:
        check.close()
    assert check.failures == 0
    assert sum(r["shared"] for r in results) + leftover == 300
    assert sum(r["shared"] for r in results) < 2 * 200 * 2
    assert [r["own"] for r in results] == [OWN_MAX] * 2
    assert store.stats()[0] == 0  # no fallback to the local table


# ------------------------------------------------------------------------ Redis failures
@pytest.mark.parametrize(
    ("mode", "expected"),
    [("local", [(True, 1, HOUR), (True, 0, HOUR), (False, 0, HOUR)]),
     ("allow", [(True, 2, 0.0)] * 3),
     ("deny", [(False, 0, 1.0)] * 3)],
)  # fmt: skip
def test_redis_failure_modes(
    table: tuple[SharedBuckets, int], mode: str, expected: list[tuple[bool, int, float]]
) -> None:
    directory = tempfile.mkdtemp(prefix="ferry-redis-")
    try:
        store = RedisBuckets(os.path.join(directory, "none.sock"), fallback=table[0],
                             on_failure=mode, retry_interval=1.0)  # type: ignore[arg-type]  # fmt: skip
        assert [store.take(b"k", 2, 1, HOUR, 10.0) for _ in range(3)] == expected
        assert (store.failures, store.fallbacks) == (1, 3)  # tried once, then waits 1 s
        store.take(b"k", 2, 1, HOUR, 11.0)
        assert store.failures == 2  # retried after the interval
    finally:
        shutil.rmtree(directory)


def test_redis_coming_back_is_used_again(redis: str, table: tuple[SharedBuckets, int]) -> None:
    store = RedisBuckets(redis + ".later", fallback=table[0], retry_interval=0.5)
    assert store.take(b"k", 2, 1, HOUR, 0.0) == (True, 1, HOUR)  # the local fallback
    os.symlink(redis, redis + ".later")
    assert store.take(b"k", 2, 1, HOUR, 0.1)[:2] == (True, 0)  # still waiting: local again
    assert store.take(b"k", 2, 1, HOUR, 0.6)[:2] == (True, 1)  # Redis' own fresh bucket
    assert (store.failures, store.fallbacks) == (1, 2)
    store.close()


def test_bad_redis_settings_name_the_value(table: tuple[SharedBuckets, int]) -> None:
    with pytest.raises(ValueError, match="on_failure 'ignore' is not one of"):
        RedisBuckets("/x", fallback=table[0], on_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout 0 must be > 0"):
        RedisBuckets("/x", fallback=table[0], timeout=0)
