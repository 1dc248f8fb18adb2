"""The `telemetry:` section of the config (docs/telemetry.md): access logs, traces, label bounds.

Every key and its default is in `agent.config`'s docstring (section `telemetry:`);
docs/telemetry.md says what each produces.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class TelemetryConfig:
    access_log: str = ""
    access_log_sample: float = 1.0
    access_log_queue: int = 8192
    otlp_endpoint: str = ""
    trace_sample: float = 0.01
    workload_label_limit: int = 500
    identity_label_limit: int = 1000


def parse_telemetry(raw: Any) -> TelemetryConfig:
    """Validate the `telemetry:` mapping; a ValueError names the key and the bad value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"telemetry: expected a mapping, got {raw!r}")
    known = {f.name for f in fields(TelemetryConfig)}
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        raise ValueError(f"telemetry: unknown key(s) {', '.join(unknown)}; known: {sorted(known)}")
    cfg = replace(TelemetryConfig(), **raw)
    for key in ("access_log", "otlp_endpoint"):
        if not isinstance(getattr(cfg, key), str):
            raise ValueError(f"telemetry.{key}: expected a string, got {getattr(cfg, key)!r}")
    for key in ("access_log_sample", "trace_sample"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"telemetry.{key}: {value!r} must be a number from 0 to 1")
    for key in ("access_log_queue", "workload_label_limit", "identity_label_limit"):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20:
            raise ValueError(f"telemetry.{key}: {value!r} must be an integer from 1 to {1 << 20}")
    if cfg.otlp_endpoint:
        url = urlsplit(cfg.otlp_endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(
                f"telemetry.otlp_endpoint: {cfg.otlp_endpoint!r} is not an http(s) URL"
            )
    return replace(
        cfg, access_log_sample=float(cfg.access_log_sample), trace_sample=float(cfg.trace_sample)
    )
