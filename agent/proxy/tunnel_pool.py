"""The worker's pool of client tunnel connections, keyed by (source workload uid, destination IP).

ztunnel pools by (source identity, destination identity, destination IP); here the source
workload stands for its identity and the directory fixes the destination identity per IP, so
(uid, ip) is the same key.  A connection takes up to `streams_per_conn` CONNECT streams; past that
(or when it is retired: certificate rotated, trust changed, GOAWAY received) a new one is opened,
and the retired one closes once its last stream ends.  The pool only tracks connections; the
worker opens them (a marked socket in the source netns) and removes them when they close.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

PoolKey = tuple[str, str]  # source workload uid, destination IP


class Pooled(Protocol):
    retired: bool

    @property
    def usable(self) -> bool: ...
    @property
    def stream_count(self) -> int: ...


C = TypeVar("C", bound=Pooled)


class TunnelPool(Generic[C]):
    def __init__(self, streams_per_conn: int) -> None:
        self.streams_per_conn = streams_per_conn
        self._conns: dict[PoolKey, list[C]] = {}

    def find(self, key: PoolKey) -> C | None:
        """A pooled connection with room for one more stream, if any."""
        for conn in self._conns.get(key, ()):
            if conn.usable and conn.stream_count < self.streams_per_conn:
                return conn
        return None

    def add(self, key: PoolKey, conn: C) -> None:
        self._conns.setdefault(key, []).append(conn)

    def discard(self, key: PoolKey, conn: C) -> None:
        conns = self._conns.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    def retire(self, uid: str | None = None) -> None:
        """No new streams on the connections of `uid` (every connection when None)."""
        for (owner, _ip), conns in self._conns.items():
            if uid is None or owner == uid:
                for conn in conns:
                    conn.retired = True

    def __iter__(self) -> Iterator[C]:
        for conns in self._conns.values():
            yield from conns

    def __len__(self) -> int:
        return sum(len(conns) for conns in self._conns.values())
