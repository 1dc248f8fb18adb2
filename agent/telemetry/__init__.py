"""Telemetry of the proxy: its settings, request counters, access logs, traces, endpoints."""
