"""What one proxy worker records of its traffic: counters, access log lines, request spans.

The worker calls `Recorder` at the few points where a connection or request is decided or ends:

- `opened(relay, ...)` when a relay starts (its workload, direction and, with an access log,
  the addresses and identities of both ends), `stream_opened(stream, ...)` when a tunnel stream
  is admitted at the destination (the source is the tunnel's peer: its identity and IP; HBONE
  carries no source port), and `closed(relay)` when either ends: the connection's
  duration goes into ferry_proxy_connection_duration_seconds, and a sampled line (bytes both
  ways, duration, whether it was reset) into the access log;
- `AccessDenials`, the enforcer's denial log, adds a line for every connection denied at L4,
  with the deciding policy and reason (denials are never sampled away);
- `requests(...)` gives an inspected connection its `RequestLog`: `decided` for each request
  head (HTTP/1.1: `key` None, answered in order; HTTP/2: the stream id) returns the headers to
  set on the request (a traceparent naming this proxy's span, when tracing is on),
  `responded(key, status)` at the response head, `ended()` when the connection closes (requests
  left without a response count with status class "none").  A denied request is logged and
  counted at once, with its status and the policy that denied it.

Everything here runs on the worker's loop and only appends to memory: the access log's writer
and the span exporter are threads of their own with bounded queues.
"""

from __future__ import annotations

import random
import socket
import time
from typing import Any

from agent.policy.facts import Facts
from agent.proxy.enforce import DenialLog
from agent.proxy.request_policy import Allowed, Denied
from agent.proxy.workload import ServedWorkload
from agent.telemetry.access_log import AccessLog, connection_line, denial_line, request_line
from agent.telemetry.counters import Counters, TelemetryStats
from agent.telemetry.settings import TelemetryConfig
from agent.telemetry.tracing import Started, Tracer, incoming

Headers = tuple[tuple[str, str], ...]
NO_HEADERS: Headers = ()


class _Connection:
    __slots__ = ("destination", "direction", "source", "uid")

    def __init__(
        self,
        uid: str,
        direction: str,
        source: tuple[str, str, int | None] | None,
        destination: tuple[str, str, int],
    ) -> None:
        self.uid, self.direction = uid, direction
        self.source, self.destination = source, destination  # source None: not logged


class Recorder:
    def __init__(self, cfg: TelemetryConfig, worker: int) -> None:
        self.counters = Counters()
        self.log = AccessLog(cfg.access_log, cfg.access_log_queue) if cfg.access_log else None
        self.sample = cfg.access_log_sample
        self.tracer = (
            Tracer(cfg.otlp_endpoint, cfg.trace_sample, worker) if cfg.otlp_endpoint else None
        )
        self.open: dict[Any, _Connection] = {}

    def stats(self) -> TelemetryStats:
        log = self.log
        return self.counters.stats(log.written if log else 0, log.dropped if log else 0)

    def reopen(self) -> None:
        if self.log is not None:
            self.log.reopen()

    def flush(self) -> None:
        """Every second, from the worker's loop: access log lines go to their writer."""
        if self.log is not None:
            self.log.flush()

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.tracer is not None:
            self.tracer.close()

    def sampled(self) -> bool:
        return self.log is not None and (self.sample >= 1.0 or random.random() < self.sample)

    # -- connections ------------------------------------------------------------------------

    def opened(
        self,
        relay: Any,
        wl: ServedWorkload,
        client: socket.socket,
        source_ip: str | None,
        dst: tuple[str, int],
        facts: Facts | None,
    ) -> None:
        """A relay of `wl` started: outbound (passthrough) when `source_ip` is None, else
        inbound from it."""
        outbound = source_ip is None
        source: tuple[str, str, int | None] | None = None
        destination = ("" if outbound else wl.identity, dst[0], dst[1])
        if self.sampled():
            try:
                peer = client.getpeername()
            except OSError:
                peer = ("", 0)
            principal = facts.source_principal if facts is not None else ""
            source = (wl.identity if outbound else principal, peer[0], peer[1])
        self.open[relay] = _Connection(
            wl.uid, "outbound" if outbound else "inbound", source, destination
        )

    def stream_opened(self, stream: Any, wl: ServedWorkload, facts: Facts) -> None:
        """An inbound tunnel stream of `wl` was admitted, from the tunnel's peer."""
        source = (facts.source_principal, facts.source_ip, None) if self.sampled() else None
        destination = (wl.identity, facts.destination_ip, facts.destination_port)
        self.open[stream] = _Connection(wl.uid, "inbound", source, destination)

    def closed(self, relay: Any) -> None:
        conn = self.open.pop(relay, None)
        if conn is None:
            return
        seconds = time.monotonic() - relay.started_at
        self.counters.connection(conn.uid, conn.direction, seconds)
        if conn.source is not None and self.log is not None:
            outcome = (
                "connect_failed"
                if relay.connect_failed
                else ("reset" if getattr(relay, "reset", False) else "closed")
            )
            security = "mtls" if conn.source[0] and conn.direction == "inbound" else "plaintext"
            self.log.emit(
                connection_line(
                    conn.uid,
                    conn.direction,
                    security,
                    conn.source,
                    conn.destination,
                    relay.bytes_up,
                    relay.bytes_down,
                    seconds,
                    outcome,
                )
            )

    def denied(self, wl: ServedWorkload, facts: Facts, policy: str, reason: str) -> None:
        if self.log is not None:
            security = "mtls" if facts.source_principal else "plaintext"
            self.log.emit(
                denial_line(
                    wl.uid,
                    security,
                    (facts.source_principal, facts.source_ip),
                    (wl.identity, facts.destination_ip, facts.destination_port),
                    policy,
                    reason,
                )
            )

    # -- requests ---------------------------------------------------------------------------

    def requests(self, wl: ServedWorkload, facts: Facts) -> RequestLog:
        return RequestLog(self, wl, facts)


class AccessDenials(DenialLog):
    """The enforcer's denial log, also writing each L4 denial to the access log (request
    denials are logged by their `RequestLog`, with their status)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def denied(
        self, workload: ServedWorkload, facts: Facts, policy: str, rule: int | None, reason: str
    ) -> None:
        super().denied(workload, facts, policy, rule, reason)
        if facts.http is None:
            self.recorder.denied(workload, facts, policy, reason)


class _Request:
    __slots__ = ("host", "logged", "method", "path", "span", "started", "trace_id")

    def __init__(
        self,
        method: str,
        path: str,
        host: str,
        started: float,
        logged: bool,
        span: Started | None,
        trace_id: str,
    ) -> None:
        self.method, self.path, self.host, self.started = method, path, host, started
        self.logged, self.span, self.trace_id = logged, span, trace_id


class RequestLog:
    """The requests of one inspected connection (see the module docstring)."""

    __slots__ = ("facts", "next_id", "pending", "recorder", "wl")

    def __init__(self, recorder: Recorder, wl: ServedWorkload, facts: Facts) -> None:
        self.recorder, self.wl, self.facts = recorder, wl, facts
        self.pending: dict[int, _Request] = {}
        self.next_id = 0

    def decided(
        self,
        key: int | None,
        method: str,
        path: str,
        host: str,
        headers: Headers,
        verdict: Allowed | Denied,
    ) -> Headers:
        """A request head was decided: the headers to set on it (its traceparent when traced)."""
        rec = self.recorder
        span = None
        trace_id = ""
        set_headers = NO_HEADERS
        if rec.tracer is not None:
            span, traceparent = rec.tracer.start(incoming(headers))
            trace_id = traceparent[3:35]
            set_headers = (("traceparent", traceparent),)
        elif rec.log is not None:
            parent = incoming(headers)
            trace_id = parent.trace_id if parent is not None else ""
        denied = isinstance(verdict, Denied)
        logged = rec.log is not None and (denied or rec.sampled())
        request = _Request(method, path, host, time.monotonic(), logged, span, trace_id)
        if isinstance(verdict, Denied):
            self._finish(request, verdict.denial.status, None, verdict.denial.denied_by)
            return NO_HEADERS
        if key is None:
            key = self.next_id
            self.next_id += 1
        self.pending[key] = request
        return set_headers

    def responded(self, key: int | None, status: int) -> None:
        pending = self.pending
        if key is None:
            key = next(iter(pending), None)
        request = pending.pop(key, None) if key is not None else None
        if request is not None:
            self._finish(request, status, time.monotonic() - request.started)

    def ended(self) -> None:
        for request in self.pending.values():
            self._finish(request, 0, None)
        self.pending.clear()

    def _finish(
        self, request: _Request, status: int, seconds: float | None, denied_by: str | None = None
    ) -> None:
        rec, wl, facts = self.recorder, self.wl, self.facts
        rec.counters.request(wl.uid, request.method, status, seconds)
        if request.span is not None and rec.tracer is not None:
            attributes: tuple[tuple[str, str | int], ...] = (
                ("http.request.method", request.method),
                ("url.path", request.path),
                ("http.response.status_code", status),
                ("ferry.workload", wl.uid),
            )
            if facts.source_principal:
                attributes += (("ferry.source.principal", facts.source_principal),)
            if denied_by is not None:
                attributes += (("ferry.policy", denied_by),)
            rec.tracer.end(request.span, request.method, attributes)
        if request.logged and rec.log is not None:
            rec.log.emit(
                request_line(
                    wl.uid,
                    "mtls" if facts.source_principal else "plaintext",
                    (facts.source_principal, facts.source_ip),
                    (wl.identity, facts.destination_ip, facts.destination_port),
                    request.method,
                    request.path,
                    request.host,
                    status,
                    seconds,
                    request.trace_id,
                    denied_by,
                )
            )
