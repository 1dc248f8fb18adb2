"""Configuration: embedded default, overrides, and errors that name the bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config


def test_embedded_default_needs_no_file() -> None:
    config = load_config(None)
    assert config.redirection.outbound_port == 15001
    assert config.redirection.inbound_port == 15006
    assert config.redirection.tunnel_port == 15008
    assert config.proxy.metrics_address == "127.0.0.1:15020"


def test_file_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "ferry.yaml"
    path.write_text(
        "redirection:\n  exclude_outbound_ports: [22]\n"
        "workloads:\n  - {netns: web, namespace: shop, service_account: web}\n"
    )
    config = load_config(path)
    assert config.redirection.exclude_outbound_ports == (22,)
    assert config.redirection.inbound_port == 15006
    assert config.workloads[0].service_account == "web"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"redirection": {"outbound_port": 70000}}, "70000"),
        ({"redirection": {"exclude_outbound_cidrs": ["10.0.0.0/33"]}}, "'10.0.0.0/33'"),
        ({"redirection": {"backend": "pf"}}, "'pf'"),
        ({"redirection": {"inbound_port": 15001}}, "must differ"),
        ({"redirection": {"mark": 0x111}}, "mark and connmark"),
        ({"proxy": {"metrics_address": "localhost"}}, "'localhost'"),
        ({"proxy": {"workers": -1}}, "-1"),
        ({"proxy": {"idle_timeout": 0}}, "idle_timeout"),
        ({"proxi": {}}, "unknown key(s) proxi"),
        ({"workloads": [{"netns": "a", "namespace": "Shop", "service_account": "x"}]}, "'Shop'"),
        ({"workloads": [{"netns": "a", "namespace": "s"}]}, "missing service_account"),
        (
            {"workloads": [{"netns": "a", "namespace": "s", "service_account": "x"}] * 2},
            "more than once: a",
        ),
    ],
)
def test_bad_values_are_named(raw: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert needle in str(info.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("redirection: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
