"""Access logs: one JSON line per connection and per inspected request, off the data path.

The worker's loop formats a line (`connection_line`, `request_line`, `denial_line`: f-strings
with JSON-escaped text, a few microseconds) and keeps it (`AccessLog.emit`); every second (the
worker's stats tick) or once BATCH lines are kept, `flush` joins them into one chunk and hands it
to a writer thread through a queue.  The writer sleeps in the queue without holding the GIL and
writes each chunk with one `write(2)` (stdout for "-", else the file opened O_APPEND, so the
workers of one proxy can share it: each chunk lands whole), so a slow disk or a full stdout pipe
stalls only the writer.  When `telemetry.access_log_queue` lines are kept or waiting, a new line
is dropped and counted (`dropped`, ferry_access_log_dropped_total) instead of ever making a
connection wait.  `reopen()` (on SIGHUP, after logrotate moved the file) makes the writer open
the path again before its next chunk.

What a line holds: time (RFC 3339, UTC, milliseconds), addresses, identities, ports, byte
counts, duration, decision and deciding policy, status, trace id; never header values, tokens,
keys or bodies (a request's path is logged without its query, which may carry a token).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from json.encoder import encode_basestring as quoted

log = logging.getLogger("ferry.telemetry")

BATCH = 256  # lines kept before they go to the writer at once
STDOUT = "-"

_second = [-1, ""]  # the last whole second formatted, and its text


def timestamp(now: float) -> str:
    """`now` as RFC 3339 UTC with milliseconds (the second's text is cached)."""
    whole = int(now)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def _end(address: str, port: int | None) -> str:
    return f'"ip":"{address}"' if port is None else f'"ip":"{address}","port":{port}'


def connection_line(
    workload: str,
    direction: str,
    security: str,
    source: tuple[str, str, int | None],
    destination: tuple[str, str, int],
    received: int,
    sent: int,
    seconds: float,
    outcome: str,
) -> str:
    """A relayed connection that ended; `source` and `destination` are (identity, ip, port),
    the source's port None when unknown (a tunnel stream)."""
    return (
        f'{{"time":"{timestamp(time.time())}","kind":"connection","workload":"{workload}",'
        f'"direction":"{direction}","security":"{security}",'
        f'"source":{{"identity":{quoted(source[0])},{_end(source[1], source[2])}}},'
        f'"destination":{{"identity":{quoted(destination[0])},'
        f"{_end(destination[1], destination[2])}}},"
        f'"bytes_received":{received},"bytes_sent":{sent},'
        f'"duration_ms":{seconds * 1000:.3f},"decision":"allow","outcome":"{outcome}"}}'
    )


def denial_line(
    workload: str,
    security: str,
    source: tuple[str, str],
    destination: tuple[str, str, int],
    policy: str,
    reason: str,
) -> str:
    """A connection denied at L4."""
    return (
        f'{{"time":"{timestamp(time.time())}","kind":"connection","workload":"{workload}",'
        f'"direction":"inbound","security":"{security}",'
        f'"source":{{"identity":{quoted(source[0])},"ip":"{source[1]}"}},'
        f'"destination":{{"identity":{quoted(destination[0])},'
        f"{_end(destination[1], destination[2])}}},"
        f'"decision":"deny","policy":{quoted(policy)},"reason":{quoted(reason)}}}'
    )


def request_line(
    workload: str,
    security: str,
    source: tuple[str, str],
    destination: tuple[str, str, int],
    method: str,
    path: str,
    host: str,
    status: int,
    seconds: float | None,
    trace_id: str,
    policy: str | None,
) -> str:
    """An inspected request, answered (`status` 0: no response came); `policy` is None when
    it was allowed, else the one that denied it ("" when none is named)."""
    duration = "" if seconds is None else f',"duration_ms":{seconds * 1000:.3f}'
    decision = '"allow"' if policy is None else f'"deny","policy":{quoted(policy)}'
    return (
        f'{{"time":"{timestamp(time.time())}","kind":"request","workload":"{workload}",'
        f'"security":"{security}",'
        f'"source":{{"identity":{quoted(source[0])},"ip":"{source[1]}"}},'
        f'"destination":{{"identity":{quoted(destination[0])},'
        f"{_end(destination[1], destination[2])}}},"
        f'"method":{quoted(method)},"path":{quoted(path)},"host":{quoted(host)},'
        f'"status":{status}{duration},"trace_id":"{trace_id}","decision":{decision}}}'
    )


class AccessLog:
    """Lines for `path` ("-": stdout): at most `capacity` waiting to be written."""

    def __init__(self, path: str, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self.lines: list[str] = []  # formatted, not yet handed to the writer
        self.handed = 0  # lines handed to the writer (counted by the loop only)
        self.written = self.failed = 0  # ... of them written, or not (by the writer only)
        self.refused = 0  # lines dropped because `capacity` were kept or waiting
        self.fd = -1
        self.reopening = False
        self.chunks: queue.SimpleQueue[tuple[bytes, int] | None] = queue.SimpleQueue()
        self._open()
        self.thread = threading.Thread(target=self._write_forever, name="access-log", daemon=True)
        self.thread.start()

    def emit(self, line: str) -> None:
        """Keep one line (dropped and counted when `capacity` lines wait).  Never blocks."""
        if len(self.lines) + self.handed - self.written - self.failed >= self.capacity:
            self.refused += 1
            return
        self.lines.append(line)
        if len(self.lines) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Hand what was kept to the writer thread, as one chunk (the worker's loop calls this
        every second; `emit` when BATCH lines are kept)."""
        lines = self.lines
        if lines:
            self.lines = []
            self.handed += len(lines)
            self.chunks.put((("\n".join(lines) + "\n").encode(), len(lines)))

    def reopen(self) -> None:
        """Open the file again before the next chunk (safe from a signal handler)."""
        self.reopening = True

    def close(self) -> None:
        """Write what was kept, then stop the writer."""
        self.flush()
        self.chunks.put(None)
        self.thread.join(timeout=2.0)
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1

    def _open(self) -> None:
        if self.path == STDOUT:
            self.fd = 1
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        old, self.fd = self.fd, fd
        if old > 2:
            os.close(old)

    def _write_forever(self) -> None:
        """The writer: blocked in the queue (no GIL held) until a chunk comes, then one
        write(2) for it."""
        while (chunk := self.chunks.get()) is not None:
            data, count = chunk
            if self.reopening:
                self.reopening = False
                try:
                    self._open()
                except OSError as exc:
                    log.error("access log %s: cannot reopen: %s", self.path, exc.strerror)
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
                self.written += count
            except OSError as exc:
                self.failed += count
                log.error("access log %s: %s (%d line(s) dropped)", self.path, exc.strerror, count)

    @property
    def dropped(self) -> int:
        """Lines lost: refused at the bound, or not written."""
        return self.refused + self.failed
