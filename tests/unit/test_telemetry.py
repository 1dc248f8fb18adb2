"""Telemetry's pure parts: traceparent, label bounds, request counters, settings, the log queue."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from agent.config import ConfigError, parse_config
from agent.proxy.metrics import OTHER, LabelBudget
from agent.telemetry.access_log import AccessLog, connection_line, request_line
from agent.telemetry.counters import REQUEST_BUCKETS, Counters, RequestCount
from agent.telemetry.tracing import (
    Parent,
    Started,
    Tracer,
    encode,
    format_traceparent,
    incoming,
    parse_traceparent,
)

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("header", "parent"),
    [
        (f"00-{TRACE}-{SPAN}-01", Parent(TRACE, SPAN, True)),
        (f"00-{TRACE}-{SPAN}-00", Parent(TRACE, SPAN, False)),
        (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
        (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is invalid
        (f"00-{TRACE.upper()}-{SPAN}-01", None),  # upper case is invalid
        (f"00-{TRACE}-{SPAN}", None),
        ("", None),
    ],
)
def test_traceparent_is_kept_only_when_valid(header: str, parent: Parent | None) -> None:
    assert parse_traceparent(header) == parent


def test_the_traceparent_for_the_app_names_the_proxy_span() -> None:
    assert format_traceparent(TRACE, "00000000000000ab", False) == f"00-{TRACE}-00000000000000ab-00"
    assert incoming((("host", "x"), ("traceparent", f"00-{TRACE}-{SPAN}-01"))) == Parent(
        TRACE, SPAN, True
    )
    assert incoming((("host", "x"),)) is None


def test_label_budget_keeps_the_first_values_and_folds_the_rest_into_other() -> None:
    budget = LabelBudget(2)
    assert [budget(v) for v in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]


def test_requests_count_by_bounded_method_and_status_class() -> None:
    counters = Counters()
    counters.request("w", "GET", 200, 0.003)
    counters.request("w", "GET", 204, 0.0001)
    counters.request("w", "BREW", 501, 0.2)
    counters.request("w", "POST", 0, None)  # no response: counted, not timed
    stats = counters.stats(lines=7, dropped=1)
    assert stats.requests == (
        RequestCount("w", "GET", "2xx", 2),
        RequestCount("w", "POST", "none", 1),
        RequestCount("w", "other", "5xx", 1),
    )
    (timed,) = stats.request_durations
    assert sum(timed.counts) == 3 and len(timed.counts) == len(REQUEST_BUCKETS) + 1
    assert timed.total == pytest.approx(0.2031)
    assert (stats.access_log_lines, stats.access_log_dropped) == (7, 1)
    counters.forget("w")
    assert counters.stats(0, 0).requests == ()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"access_log_sample": 1.5}, "telemetry.access_log_sample: 1.5 must be a number from 0"),
        ({"access_log_queue": 0}, "telemetry.access_log_queue: 0 must be an integer"),
        ({"otlp_endpoint": "collector:4318"}, "telemetry.otlp_endpoint: 'collector:4318' is not"),
        ({"access_log": ["x"]}, "telemetry.access_log: expected a string, got ['x']"),
        ({"traces": True}, "telemetry: unknown key(s) traces"),
    ],
)
def test_bad_telemetry_settings_name_the_key_and_value(raw: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"telemetry": raw})
    assert needle in str(info.value)


def test_a_full_access_log_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), capacity=3)
    for n in range(5):
        log.emit(json.dumps({"n": n}))  # kept, not flushed: the bound counts them
    assert log.dropped == 2
    log.close()  # writes what was kept
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == [0, 1, 2]
    assert log.written == 3


def test_access_log_lines_are_json_with_the_text_escaped_and_no_query() -> None:
    line = json.loads(
        request_line(
            "uid",
            "mtls",
            ("spiffe://td/ns/a/sa/b", "10.0.0.1"),
            ("spiffe://td/ns/c/sa/d", "10.0.0.2", 8080),
            "GET",
            '/a"b\\c',
            "h\n",
            403,
            None,
            TRACE,
            "ns/deny",
        )
    )
    assert line["path"] == '/a"b\\c' and line["host"] == "h\n" and line["status"] == 403
    assert line["decision"] == "deny" and line["policy"] == "ns/deny" and line["trace_id"] == TRACE
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    allowed = json.loads(
        request_line(
            "uid",
            "plaintext",
            ("", "10.0.0.1"),
            ("", "10.0.0.2", 80),
            "GET",
            "/",
            "h",
            200,
            0.0123,
            "",
            None,
        )
    )
    assert allowed["decision"] == "allow" and allowed["duration_ms"] == 12.3
    connection = json.loads(
        connection_line(
            "uid",
            "inbound",
            "plaintext",
            ("", "10.0.0.1", 4000),
            ("x", "10.0.0.2", 9000),
            10,
            20,
            1.5,
            "closed",
        )
    )
    assert connection["source"] == {"identity": "", "ip": "10.0.0.1", "port": 4000}
    assert (connection["bytes_received"], connection["bytes_sent"]) == (10, 20)


def test_spans_encode_as_an_otlp_export_request() -> None:
    started = Started(TRACE, "00000000000000ab", SPAN, 1_000)
    body = encode(
        [(started, 2_000, "GET", (("url.path", "/x"), ("http.response.status_code", 200)))], 3
    )
    request = ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {a.key: a.value for a in resource_spans.resource.attributes}
    assert resource["service.name"].string_value == "ferry-proxy"
    assert resource["ferry.worker"].int_value == 3
    (span,) = resource_spans.scope_spans[0].spans
    assert (span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex()) == (
        TRACE,
        "00000000000000ab",
        SPAN,
    )
    assert (span.name, span.kind, span.start_time_unix_nano, span.end_time_unix_nano) == (
        "GET",
        ProtoSpan.SPAN_KIND_SERVER,
        1_000,
        2_000,
    )
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["url.path"].string_value == "/x"
    assert attributes["http.response.status_code"].int_value == 200


def test_a_trace_started_here_is_sampled_at_the_configured_rate() -> None:
    tracer = Tracer("http://127.0.0.1:9/v1/traces", 0.0, 0)  # nothing is exported from here
    try:
        span, traceparent = tracer.start(None)
        assert span is None and parse_traceparent(traceparent) is not None
        assert traceparent.endswith("-00")
        span, traceparent = tracer.start(Parent(TRACE, SPAN, True))  # the caller's flag wins
        assert span is not None and span.parent_id == SPAN and span.trace_id == TRACE
        assert traceparent == f"00-{TRACE}-{span.span_id}-01"
    finally:
        tracer.stopping.set()
