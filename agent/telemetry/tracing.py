"""Traces of inspected requests: W3C `traceparent` kept or started, one span per request.

The pure part reads and writes the `traceparent` header (W3C Trace Context level 1):
`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; a header that is not exactly that (all
zero ids, version ff, upper case) is ignored and a new trace starts, as the spec asks.

`Tracer` records the spans: one per request at the proxy that inspects it (a SERVER span, child
of the caller's span when a valid traceparent came in), started when the request head is
decided, ended at the response head (or at once for a request the proxy answered itself).  The
request goes on to the app with a traceparent naming this span as its parent, so the app's own
spans hang below the proxy's.  A trace started here is sampled with `telemetry.trace_sample`; an
incoming one keeps its sampled flag; an unsampled request still gets its traceparent, and no span.

Export, off the data path: an ended span is one tuple appended to a bounded deque (full: the
span is dropped and counted); an exporter thread takes what waits every EXPORT_EVERY (at most
BATCH spans a request), encodes an OTLP `ExportTraceServiceRequest` with opentelemetry-proto's
messages (`encode`) and POSTs it as protobuf to `telemetry.otlp_endpoint` (OTLP/HTTP); a failed
export drops its batch, counted, logged at most once a minute.  This is what OpenTelemetry's SDK
does with a BatchSpanProcessor and its OTLP/HTTP exporter, without the SDK's per-span objects:
on one loaded worker those cost ~220 us a request in the loop and its encoder ~140 us a span in
the exporter thread; this ~10 us and ~35 us (docs/telemetry.md).
"""

from __future__ import annotations

import collections
import logging
import random
import re
import threading
import time
import urllib.request
from typing import NamedTuple

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from agent import __version__

log = logging.getLogger("ferry.telemetry")

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
EXPORT_EVERY = 1.0  # seconds between exports
BATCH = 512  # spans per export request at most
QUEUE = 8192  # ended spans waiting for the exporter at most
TIMEOUT = 5.0  # seconds one export may take
Attribute = tuple[str, str | int]


class Parent(NamedTuple):
    trace_id: str  # 32 lower-case hex digits
    span_id: str  # 16
    sampled: bool


def parse_traceparent(value: str) -> Parent | None:
    """The caller's trace context, or None when `value` is not a valid version-00 header."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None or match[1] == _ZERO_TRACE or match[2] == _ZERO_SPAN:
        return None
    return Parent(match[1], match[2], bool(int(match[3], 16) & 1))


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def incoming(headers: tuple[tuple[str, str], ...]) -> Parent | None:
    """The request's traceparent (field names are lower case), parsed."""
    for name, value in headers:
        if name == "traceparent":
            return parse_traceparent(value)
    return None


class Started(NamedTuple):
    """A span in progress: its ids and start (None from `Tracer.start`: not sampled)."""

    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    start_ns: int


def _span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


class Tracer:
    """The spans of one proxy worker, exported to `endpoint` in batches (module docstring)."""

    def __init__(self, endpoint: str, sample: float, worker: int) -> None:
        self.endpoint, self.sample, self.worker = endpoint, sample, worker
        self.ended: collections.deque[tuple[Started, int, str, tuple[Attribute, ...]]] = (
            collections.deque()
        )
        self.exported = self.dropped = 0
        self.last_complaint = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._export_forever, name="traces", daemon=True)
        self.thread.start()

    def start(self, parent: Parent | None) -> tuple[Started | None, str]:
        """A span for one request starting now (None when not sampled) and the traceparent the
        app gets."""
        span_id = _span_id()
        if parent is None:
            trace_id = f"{random.getrandbits(128) or 1:032x}"
            sampled = self.sample >= 1.0 or random.random() < self.sample
            parent_id = ""
        else:
            trace_id, parent_id, sampled = parent
        started = Started(trace_id, span_id, parent_id, time.time_ns()) if sampled else None
        return started, format_traceparent(trace_id, span_id, sampled)

    def end(self, span: Started, name: str, attributes: tuple[Attribute, ...]) -> None:
        if len(self.ended) >= QUEUE:
            self.dropped += 1
        else:
            self.ended.append((span, time.time_ns(), name, attributes))

    def close(self) -> None:
        """Export what waits (one last try), then stop."""
        self.stopping.set()
        self.thread.join(timeout=TIMEOUT + 1)
        self._export()

    def _export_forever(self) -> None:
        while not self.stopping.wait(EXPORT_EVERY):
            while self._export() == BATCH:
                pass

    def _export(self) -> int:
        ended, popleft = self.ended, self.ended.popleft
        batch = [popleft() for _ in range(min(len(ended), BATCH))]
        if not batch:
            return 0
        try:
            body = encode(batch, self.worker)
            request = urllib.request.Request(
                self.endpoint, body, {"Content-Type": "application/x-protobuf"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
                answer.read()
            self.exported += len(batch)
        except (OSError, ValueError) as exc:
            self.dropped += len(batch)
            now = time.monotonic()
            if now - self.last_complaint >= 60:
                self.last_complaint = now
                log.warning("traces to %s: %s (%d span(s) dropped)", self.endpoint, exc, len(batch))
        return len(batch)


def encode(batch: list[tuple[Started, int, str, tuple[Attribute, ...]]], worker: int) -> bytes:
    """An OTLP ExportTraceServiceRequest (protobuf) holding `batch`, from service ferry-proxy."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    for key, value in (("service.name", "ferry-proxy"), ("service.version", __version__)):
        attribute = resource_spans.resource.attributes.add()
        attribute.key = key
        attribute.value.string_value = value
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.int_value = "ferry.worker", worker
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "ferry.proxy"
    server = ProtoSpan.SPAN_KIND_SERVER
    for started, end_ns, name, attributes in batch:
        span = scope_spans.spans.add()
        span.trace_id = bytes.fromhex(started.trace_id)
        span.span_id = bytes.fromhex(started.span_id)
        if started.parent_id:
            span.parent_span_id = bytes.fromhex(started.parent_id)
        span.name, span.kind = name, server
        span.start_time_unix_nano, span.end_time_unix_nano = started.start_ns, end_ns
        for name_, value_ in attributes:
            attribute = span.attributes.add()
            attribute.key = name_
            if isinstance(value_, int):
                attribute.value.int_value = value_
            else:
                attribute.value.string_value = value_
    data: bytes = request.SerializeToString()
    return data
