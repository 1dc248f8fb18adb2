"""Request and duration counters of one proxy worker, and their wire form in `Stats` (pure).

A worker counts inspected requests per (workload, method, status class) and observes connection
durations per (workload, direction) and request durations (request head to response head) per
workload into fixed-bucket histograms.  `Counters.stats()` turns them into `TelemetryStats`, a
part of the worker's cumulative `messages.Stats`; the supervisor sums the workers' records
(`agent.proxy.metrics`).  Labels are bounded here already: a method outside RFC 9110's set (and
PATCH) counts as "other", a status as its class ("2xx"; "none" when no response came).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

CONNECTION_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
REQUEST_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "none"


@dataclass(frozen=True)
class Histogram:
    """Observations of one workload (and direction, "" for requests): `counts[i]` of them were
    at most bucket i, not in an earlier bucket; the last entry counts the ones above all."""

    uid: str
    direction: str
    counts: tuple[int, ...]
    total: float  # sum of the observations, seconds


@dataclass(frozen=True)
class RequestCount:
    uid: str
    method: str
    status_class: str
    count: int


@dataclass(frozen=True)
class TelemetryStats:
    requests: tuple[RequestCount, ...] = ()
    connection_durations: tuple[Histogram, ...] = ()
    request_durations: tuple[Histogram, ...] = ()
    access_log_lines: int = 0
    access_log_dropped: int = 0


class Observed:
    """One histogram: counts per bucket (the last: above all) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.total = 0.0

    def observe(self, buckets: tuple[float, ...], value: float) -> None:
        self.counts[bisect_left(buckets, value)] += 1
        self.total += value

    def cumulative(self, buckets: tuple[float, ...]) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations at most that), "+Inf" last."""
        running, out = 0, []
        for bound, count in zip([*map(str, buckets), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out


class Counters:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.connections: dict[tuple[str, str], Observed] = {}
        self.request_times: dict[str, Observed] = {}

    def connection(self, uid: str, direction: str, seconds: float) -> None:
        key = (uid, direction)
        seen = self.connections.get(key)
        if seen is None:
            seen = self.connections[key] = Observed(len(CONNECTION_BUCKETS))
        seen.observe(CONNECTION_BUCKETS, seconds)

    def request(self, uid: str, method: str, status: int, seconds: float | None) -> None:
        """One request answered with `status` (0: none), `seconds` after its head (None: the
        proxy answered it itself, not timed)."""
        key = (uid, method_label(method), status_class(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is None:
            return
        seen = self.request_times.get(uid)
        if seen is None:
            seen = self.request_times[uid] = Observed(len(REQUEST_BUCKETS))
        seen.observe(REQUEST_BUCKETS, seconds)

    def forget(self, uid: str) -> None:
        """A workload is no longer served: its counters go with it (as its flows do)."""
        for key in [k for k in self.requests if k[0] == uid]:
            del self.requests[key]
        for ckey in [k for k in self.connections if k[0] == uid]:
            del self.connections[ckey]
        self.request_times.pop(uid, None)

    def stats(self, lines: int, dropped: int) -> TelemetryStats:
        return TelemetryStats(
            requests=tuple(RequestCount(*key, n) for key, n in sorted(self.requests.items())),
            connection_durations=tuple(
                Histogram(uid, direction, tuple(seen.counts), seen.total)
                for (uid, direction), seen in sorted(self.connections.items())
            ),
            request_durations=tuple(
                Histogram(uid, "", tuple(seen.counts), seen.total)
                for uid, seen in sorted(self.request_times.items())
            ),
            access_log_lines=lines,
            access_log_dropped=dropped,
        )
