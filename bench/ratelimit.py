"""Rate-limit stores: takes per second, one process and two contending, shared memory vs Redis.

    .venv/bin/python -m bench.ratelimit [--seconds 2]

Rows (each a fixed time; processes are forked and start together; two processes on a 2-core
machine really run at once):
- `shm`: `SharedBuckets.take` on one key (every take on the same set lock) and on 10,000 keys
  (the locks spread over the sets);
- `redis`: `RedisBuckets.take` against a redis-server this benchmark starts on a Unix socket
  (Debian package redis-server), one key;
- `check`: `WorkloadRateLimits.check` of a new connection over shared memory with 1 rule and with
  1,000 per-client rules (the principal index: the cost must not grow with the rule count);
- `lock`: the lock alone around a read-modify-write of one shared counter: the robust
  process-shared pthread mutex the store uses against an open-file-description byte-range lock
  (`F_OFD_SETLKW`), the alternative without ctypes (the locking choice's numbers).

The table goes to stdout.  Numbers are only comparable within one run (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent.policy.facts import Facts
from agent.policy.ratelimit import WorkloadRateLimits
from agent.proxy.ratelimit_redis import RedisBuckets
from agent.proxy.ratelimit_store import HEADER_SIZE, SharedBuckets

HOUR = 3600.0
Work = Callable[[int], object]  # one operation; the argument is the iteration number


def rate(make: Callable[[], Work], processes: int, seconds: float) -> float:
    """Operations per second of `processes` forked processes, each running `make()`'s work."""
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:  # the child: build, wait for go, count until the time is up
            code = 1
            try:
                work = make()
                os.read(go_read, 1)
                count, deadline = 0, time.monotonic() + seconds
                while time.monotonic() < deadline:
                    for i in range(count, count + 200):
                        work(i)
                    count += 200
                os.write(out_write, struct.pack("<Q", count))
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    os.write(go_write, b"g" * processes)
    total = 0
    for _ in children:
        (count,) = struct.unpack("<Q", os.read(out_read, 8))
        total += count
    for pid in children:
        os.waitpid(pid, 0)
    for fd in (go_read, go_write, out_read, out_write):
        os.close(fd)
    return total / seconds


@contextmanager
def redis_server() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed (Debian package redis-server)")
    directory = tempfile.mkdtemp(prefix="ferry-redis-")
    path = os.path.join(directory, "redis.sock")
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", path, "--save", "", "--appendonly", "no",
         "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if process.poll() is not None or time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.02)
        yield path
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def shm_work(fd: int, keys: int) -> Callable[[], Work]:
    def make() -> Work:
        store = SharedBuckets.attach(fd)
        names = [b"client-%d" % i for i in range(keys)]
        return lambda i: store.take(names[i % keys], 10**9, 1, 1.0, time.monotonic())

    return make


def redis_work(path: str, fd: int) -> Callable[[], Work]:
    def make() -> Work:
        store = RedisBuckets(path, fallback=SharedBuckets.attach(fd), timeout=1.0)
        return lambda i: store.take(b"client", 10**9, 1, 1.0, time.monotonic())

    return make


def check_work(fd: int, rules: int) -> Callable[[], Work]:
    def make() -> Work:
        store = SharedBuckets.attach(fd)
        spec = {"rules": [
            {"match": {"principals": [f"td/ns/shop/sa/c{i}"]}, "key": "source.ip",
             "bucket": {"maxTokens": 10**9, "fillInterval": "1s"}}
            for i in range(rules)
        ]}  # fmt: skip
        limits = WorkloadRateLimits.from_specs([("shop", "limits", spec)], trust_domain="td")
        facts = Facts("spiffe://td/ns/shop/sa/c0", "10.0.0.9", "10.0.0.1", 8080)
        return lambda i: limits.check(facts, store, time.monotonic())

    return make


def pthread_lock_work(fd: int) -> Callable[[], Work]:
    def make() -> Work:
        store = SharedBuckets.attach(fd)  # its first set's mutex and spare bytes as the counter
        region, at = store._region, HEADER_SIZE
        counter = at + 200

        def work(_: int) -> None:
            store._lock(at)
            (value,) = struct.unpack_from("<q", region, counter)
            struct.pack_into("<q", region, counter, value + 1)
            store._unlock_fn(store._base + at)

        return work

    return make


def ofd_lock_work(fd: int) -> Callable[[], Work]:
    def make() -> Work:
        store = SharedBuckets.attach(fd)
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # a description of its own: OFD locks
        region, counter = store._region, HEADER_SIZE + 200
        lock = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, HEADER_SIZE, 384, 0)
        unlock = struct.pack("hhqqi", fcntl.F_UNLCK, os.SEEK_SET, HEADER_SIZE, 384, 0)

        def work(_: int) -> None:
            fcntl.fcntl(own, fcntl.F_OFD_SETLKW, lock)
            (value,) = struct.unpack_from("<q", region, counter)
            struct.pack_into("<q", region, counter, value + 1)
            fcntl.fcntl(own, fcntl.F_OFD_SETLKW, unlock)

        return work

    return make


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement (2)")
    options = parser.parse_args(argv)
    seconds = options.seconds
    store, fd = SharedBuckets.create()
    rows: list[tuple[str, str, float, float]] = []

    def measure(store_name: str, what: str, make: Callable[[], Work]) -> None:
        one, two = rate(make, 1, seconds), rate(make, 2, seconds)
        rows.append((store_name, what, one, two))
        print(f"  {store_name} {what}: {one:,.0f} / {two:,.0f} per s", file=sys.stderr)

    try:
        measure("shm", "take, 1 key", shm_work(fd, 1))
        measure("shm", "take, 10,000 keys", shm_work(fd, 10_000))
        with redis_server() as path:
            measure("redis", "take, 1 key (Unix socket)", redis_work(path, fd))
        measure("check", "new connection, 1 rule (shm)", check_work(fd, 1))
        measure("check", "new connection, 1,000 rules (shm)", check_work(fd, 1000))
        measure("lock", "robust pthread mutex (ctypes)", pthread_lock_work(fd))
        measure("lock", "F_OFD_SETLKW byte-range lock", ofd_lock_work(fd))
    finally:
        store.close()
        os.close(fd)
    print("| store | operation | 1 process (/s) | 2 processes (/s, total) |")
    print("| --- | --- | ---: | ---: |")
    for store_name, what, one, two in rows:
        print(f"| {store_name} | {what} | {one:,.0f} | {two:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
