"""Token buckets shared by every proxy worker of a node: one memfd, mapped by all of them.

Limits must be exact across the N worker processes (not rate/N each), so bucket state lives in
one shared-memory region: the supervisor creates it (`SharedBuckets.create(slots)` -> the store
and a memfd), sends the fd to every worker with the other fds (SCM_RIGHTS) and each worker maps
it (`SharedBuckets.attach(fd)`).  The memfd is sealed against growing and shrinking, so no
process can truncate the region under the others (that would be SIGBUS); it is freed by the
kernel when the last process holding the fd or a mapping exits.  The bucket arithmetic is
`agent.policy.ratelimit.take_token`; this module only stores and locks.

Layout (little-endian):

    header   128 bytes: magic b"FERRYRL\\x01", ways, sets, set size
    set[i]   384 bytes, sets = slots / 8 (a power of two):
      +0     a process-shared, robust pthread mutex (glibc: 40 bytes on x86_64, 48 on aarch64)
      +56    u64 evictions of live buckets from this set (statistics)
      +64    u64 hash[8]: the first 64 bits of the key's BLAKE2b-128 digest; 0 = free way
      +128   way[8] of (u64 check: the digest's other 64 bits, i64 tokens in token-nanoseconds,
             i64 last refill (ns), i64 time at which the bucket is full again (ns))

The table is set-associative (an 8-way cache): a key's hash picks one set, the key lives in one of
its 8 ways, found by comparing the 8 hashes in one unpack; the 128 bits of hash and check make a
mix-up of two keys practically impossible (a hash match with a different check is treated as a
different key and replaces it).  A new key takes a free way; in a full set it takes the way whose
bucket is full soonest: a bucket already full again carries no state (a full bucket is what a new
key starts with), so reusing it loses nothing.  Only when all 8 buckets of the set are still
refilling is a live bucket evicted (counted in the set's `evictions`); its key starts over full,
so each such eviction can admit at most `maxTokens` more than the limit.  With the default 65,536
slots that needs more than 65,536 keys refilling at once, spread evenly (the hash spreads them),
e.g. 65,536 distinct clients each seen within one refill time.  Size the table for more keys.

Locking: one mutex per set, so takes on different keys rarely contend.  The mutex is a
process-shared robust pthread mutex in the region, called through ctypes: uncontended it is one
atomic instruction in userspace (a futex syscall only when contended), and robust means a worker
killed while holding it does not wedge the others: the next locker gets EOWNERDEAD, marks it
consistent and goes on (the dead worker's half-written slot, at worst, holds one wrong bucket
value).  The alternative without ctypes, open-file-description byte-range locks
(`F_OFD_SETLKW` on a per-worker reopened fd, released by the kernel when a holder dies), costs
two syscalls per take even uncontended.  Lock + read-modify-write + unlock of one shared counter
on the 2-core dev machine (shared and noisy: ranges over 4 runs): mutex 0.28-0.69 M/s in one
process and 0.25-0.78 M/s for 2 contending (exact), OFD lock 0.16-0.28 M/s and 0.12-0.29 M/s;
uncontended (the usual case with 8,192 set locks) the mutex costs 1.2 us against 2.9 us.  A
whole `take` (hash, lock, arithmetic, unlock) runs at 0.10-0.16 M/s per process
(bench/ratelimit.py).

Every process must pass the same clock as `now`: the proxy uses `time.monotonic()`
(CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from functools import cache
from hashlib import blake2b

from agent.policy.ratelimit import NS_PER_SECOND, take_token

DEFAULT_SLOTS = 65_536
WAYS = 8
MAGIC = b"FERRYRL\x01"
HEADER_SIZE = 128
SET_SIZE = 384
MUTEX_SPACE = 56  # bytes reserved for pthread_mutex_t
EVICTIONS_AT, HASHES_AT, WAYS_AT = 56, 64, 128
SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
EOWNERDEAD = 130
PTHREAD_PROCESS_SHARED = 1
PTHREAD_MUTEX_ROBUST = 1
MAX_I64 = (1 << 63) - 1

_HEADER = struct.Struct("<8sIII")  # magic, ways, sets, set size
_DIGEST = struct.Struct("<QQ")
_HASHES = struct.Struct(f"<{WAYS}Q")
_HASH = struct.Struct("<Q")
_WAY = struct.Struct("<Qqqq")  # check, tokens, last_ns, full_at_ns
_FULL_AT = struct.Struct(f"<{WAYS * 4}q")


class BucketTableError(ValueError):
    """A table size or an fd that cannot be a bucket table (the message names the value)."""


@cache
def _pthread() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("pthread_mutex_init", "pthread_mutexattr_init",
                 "pthread_mutexattr_setpshared", "pthread_mutexattr_setrobust"):  # fmt: skip
        getattr(libc, name).restype = ctypes.c_int
    for name in ("pthread_mutex_lock", "pthread_mutex_unlock", "pthread_mutex_consistent"):
        function = getattr(libc, name)
        function.argtypes = (ctypes.c_void_p,)
        function.restype = ctypes.c_int
    return libc


def _checked(result: int, what: str) -> None:
    if result != 0:
        raise OSError(result, f"{what}: {os.strerror(result)}")


class SharedBuckets:
    """A `BucketStore` (agent.policy.ratelimit) over the shared region; see the module doc."""

    def __init__(self, region: mmap.mmap) -> None:
        magic, ways, sets, set_size = _HEADER.unpack_from(region, 0)
        if magic != MAGIC or ways != WAYS or set_size != SET_SIZE:
            raise BucketTableError(
                f"not a Ferry bucket table (magic {magic!r}, {ways} ways, set size {set_size})"
            )
        if len(region) != HEADER_SIZE + sets * SET_SIZE:
            raise BucketTableError(f"bucket table of {len(region)} bytes for {sets} sets")
        self._region = region
        self._sets: int = sets
        self._mask: int = sets - 1
        self._anchor = ctypes.c_char.from_buffer(region)  # keeps the address valid
        self._base = ctypes.addressof(self._anchor)
        libc = _pthread()
        self._lock_fn = libc.pthread_mutex_lock
        self._unlock_fn = libc.pthread_mutex_unlock
        self._consistent = libc.pthread_mutex_consistent

    # ------------------------------------------------------------------- setup
    @classmethod
    def create(cls, slots: int = DEFAULT_SLOTS) -> tuple[SharedBuckets, int]:
        """A new table of `slots` buckets (a power of two >= 8): the store and its memfd, which
        the caller owns (send it to every worker; keep it to give restarted ones)."""
        if slots < WAYS or slots & (slots - 1):
            raise BucketTableError(f"slots must be a power of two >= {WAYS}, got {slots}")
        sets = slots // WAYS
        size = HEADER_SIZE + sets * SET_SIZE
        fd = os.memfd_create("ferry-ratelimit", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            region = mmap.mmap(fd, size)
            _HEADER.pack_into(region, 0, MAGIC, WAYS, sets, SET_SIZE)
            store = cls(region)
            store._init_locks()
        except BaseException:
            os.close(fd)
            raise
        return store, fd

    @classmethod
    def attach(cls, fd: int) -> SharedBuckets:
        """Map the table the supervisor created; `fd` stays the caller's (close it when
        attached: the mapping keeps the memory)."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise BucketTableError(f"fd {fd} is not a sealed memfd: {exc.strerror}") from exc
        if seals & SEALS != SEALS:
            raise BucketTableError(f"fd {fd} is not sealed against resizing (seals {seals:#x})")
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise BucketTableError(f"fd {fd}: {size} bytes is too small for a bucket table")
        return cls(mmap.mmap(fd, size))

    def _init_locks(self) -> None:
        libc = _pthread()
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t (4 bytes on glibc)
        _checked(libc.pthread_mutexattr_init(attr), "pthread_mutexattr_init")
        _checked(libc.pthread_mutexattr_setpshared(attr, PTHREAD_PROCESS_SHARED),
                 "pthread_mutexattr_setpshared")  # fmt: skip
        _checked(libc.pthread_mutexattr_setrobust(attr, PTHREAD_MUTEX_ROBUST),
                 "pthread_mutexattr_setrobust")  # fmt: skip
        for index in range(self._sets):
            address = ctypes.c_void_p(self._base + HEADER_SIZE + index * SET_SIZE)
            _checked(libc.pthread_mutex_init(address, attr), "pthread_mutex_init")

    def close(self) -> None:
        """Unmap (the region lives on while another process maps it)."""
        del self._anchor
        self._region.close()

    # -------------------------------------------------------------------- take
    def take(
        self, key: bytes, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float
    ) -> tuple[bool, int, float]:
        """Refill and take one token from the bucket of `key`, atomically across processes."""
        where, check = _DIGEST.unpack(blake2b(key, digest_size=16).digest())
        where = where or 1  # 0 marks a free way
        interval_ns = round(fill_interval * NS_PER_SECOND)
        now_ns = round(now * NS_PER_SECOND)
        full = max_tokens * interval_ns
        at = HEADER_SIZE + (where & self._mask) * SET_SIZE
        region = self._region
        self._lock(at)
        try:
            way, new = self._way(at, where, check, now_ns)
            slot = at + WAYS_AT + way * _WAY.size
            if new:
                tokens, last_ns = full, now_ns
            else:
                _, tokens, last_ns, _ = _WAY.unpack_from(region, slot)
            tokens, last_ns, allowed, remaining, next_token = take_token(
                tokens, last_ns, max_tokens, tokens_per_fill, interval_ns, now_ns
            )
            full_at = min(MAX_I64, last_ns + -(-(full - tokens) // tokens_per_fill))
            _WAY.pack_into(region, slot, check, tokens, last_ns, full_at)
        finally:
            self._unlock_fn(self._base + at)
        return allowed, remaining, next_token

    def _way(self, at: int, where: int, check: int, now_ns: int) -> tuple[int, bool]:
        """The way holding the key, or the way given to it (its hash written) and True."""
        region = self._region
        hashes = _HASHES.unpack_from(region, at + HASHES_AT)
        if where in hashes:
            way = hashes.index(where)
            if _HASH.unpack_from(region, at + WAYS_AT + way * _WAY.size)[0] == check:
                return way, False
            self._count_eviction(at)  # same 64-bit hash, another key: replace it
        elif 0 in hashes:
            way = hashes.index(0)
        else:
            full_at = _FULL_AT.unpack_from(region, at + WAYS_AT)[3::4]
            soonest = min(full_at)
            way = full_at.index(soonest)
            if soonest > now_ns:
                self._count_eviction(at)
        _HASH.pack_into(region, at + HASHES_AT + way * 8, where)
        return way, True

    def _count_eviction(self, at: int) -> None:
        (count,) = _HASH.unpack_from(self._region, at + EVICTIONS_AT)
        _HASH.pack_into(self._region, at + EVICTIONS_AT, count + 1)

    def _lock(self, at: int) -> None:
        address = self._base + at
        result = self._lock_fn(address)
        if result == EOWNERDEAD:  # its holder died: the slot data is ours to go on with
            _checked(self._consistent(address), "pthread_mutex_consistent")
        else:
            _checked(result, "pthread_mutex_lock")

    # ------------------------------------------------------------------- stats
    def stats(self) -> tuple[int, int]:
        """(buckets in use, live buckets evicted so far), read without locking."""
        region = self._region
        used = evicted = 0
        for index in range(self._sets):
            at = HEADER_SIZE + index * SET_SIZE
            used += WAYS - _HASHES.unpack_from(region, at + HASHES_AT).count(0)
            (count,) = _HASH.unpack_from(region, at + EVICTIONS_AT)
            evicted += count
        return used, evicted

    @property
    def slots(self) -> int:
        return self._sets * WAYS
