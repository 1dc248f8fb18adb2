"""Configuration: embedded default, overrides, and errors that name the bad value."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, node_name_of, parse_config


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
        ({"redirection": {"backend": "pf"}}, "'pf' is not one of auto, iptables, nftables, ebpf"),
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


@pytest.mark.parametrize("backend", ["auto", "iptables", "nftables", "ebpf"])
def test_every_backend_is_a_valid_setting(backend: str) -> None:
    assert parse_config({"redirection": {"backend": backend}}).redirection.backend == backend


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("redirection: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (
            {"redirection": {"exclude_outbound_ports": 22}},
            "exclude_outbound_ports: expected a list",
        ),
        (
            {"redirection": {"exclude_inbound_ports": "22"}},
            "exclude_inbound_ports: expected a list",
        ),
        (
            {"redirection": {"exclude_outbound_cidrs": "10.0.0.0/8"}},
            "exclude_outbound_cidrs: expected a list, got '10.0.0.0/8'",
        ),
        ({"redirection": {"exclude_outbound_ports": {"a": 1}}}, "expected a list"),
        ({"redirection": {"exclude_outbound_ports": ["22"]}}, "'22' is not a TCP port"),
        ({"redirection": {"exclude_outbound_cidrs": [["10.0.0.0/8"]]}}, "is not a CIDR"),
        ({"redirection": {"outbound_port": [15001]}}, "[15001] is not a TCP port"),
        ({"redirection": {"ipv6": [True]}}, "ipv6: [True] must be true or false"),
        ({"redirection": ["iptables"]}, "redirection: expected a mapping"),
        ({"proxy": "fast"}, "proxy: expected a mapping, got 'fast'"),
        ({"agent": 10}, "agent: expected a mapping"),
        ({"identity": ["cluster.local"]}, "identity: expected a mapping"),
        ({"mesh": "strict"}, "mesh: expected a mapping"),
        ({"mesh": {"namespace_modes": "prod"}}, "mesh.namespace_modes: expected a mapping"),
        ({"mesh": {"namespace_modes": {"prod": ["strict"]}}}, "mesh.namespace_modes.prod"),
        ({"mesh": {"default_mode": ["strict"]}}, "mesh.default_mode: ['strict']"),
        ({"mesh": {"egress": ["refuse"]}}, "mesh.egress: ['refuse']"),
        ({"mesh": {"directory": ["/x"]}}, "mesh.directory: ['/x'] is not a path"),
        ({"identity": {"trust_domain": ["a"]}}, "identity.trust_domain: invalid trust domain"),
        ({"identity": {"node_credentials": 1}}, "node_credentials: 1 is not a path"),
        ({"workloads": "web"}, "workloads: expected a list, got 'web'"),
        ({"workloads": {"netns": "web"}}, "workloads: expected a list"),
        ({"workloads": ["web"]}, "workloads[0]: expected a mapping, got 'web'"),
        (
            {"workloads": [{"netns": ["web"], "namespace": "s", "service_account": "x"}]},
            "workloads[0].netns: expected a string, got ['web']",
        ),
        (
            {"workloads": [{"netns": "web", "namespace": {"a": 1}, "service_account": "x"}]},
            "workloads[0].namespace: expected a string",
        ),
        ([1, 2], "config: expected a mapping"),
        ({1: 2}, "unknown key(s) 1"),
    ],
)
def test_a_wrong_type_is_a_config_error_naming_the_key(raw: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("node_name", "needle"),
    [
        ("../x", "invalid node name '../x'"),
        (["node-a"], "invalid node name ['node-a']"),
        ("Node-A", "invalid node name 'Node-A'"),
        ("a" * 254, "at most 253 characters"),
        ("node_a", "'node_a'"),
        ("", "invalid node name ''"),
    ],
)
def test_node_name_is_a_dns_subdomain(node_name: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"node_name": node_name})
    assert str(info.value).startswith("node_name: ")
    assert needle in str(info.value)


def test_valid_names_pass() -> None:
    config = parse_config({"node_name": "node-a.rack-1", "identity": {"trust_domain": "ex.org"}})
    assert (config.node_name, config.identity.trust_domain) == ("node-a.rack-1", "ex.org")
    assert parse_config({"workloads": None, "redirection": {"exclude_outbound_ports": None}})


def test_the_default_node_name_is_checked_where_it_names_a_file() -> None:
    config = replace(load_config(None), node_name="My_Host")
    with pytest.raises(ConfigError, match="host name 'My_Host' is not a valid node name"):
        node_name_of(config)


def test_the_policy_section_defaults_and_overrides(tmp_path: Path) -> None:
    policy = load_config(None).policy
    assert (policy.directory, policy.root_namespace) == ("/etc/ferry/policies", "ferry-system")
    assert (policy.jwks_refresh, policy.jwks_timeout) == (1200.0, 5.0)
    path = tmp_path / "ferry.yaml"
    path.write_text(
        "policy:\n  directory: /srv/policies\n  root_namespace: istio-system\n"
        "  jwks_refresh: 60\n  jwks_timeout: 0.5\n"
    )
    policy = load_config(path).policy
    assert (policy.directory, policy.root_namespace) == ("/srv/policies", "istio-system")
    assert (policy.jwks_refresh, policy.jwks_timeout) == (60.0, 0.5)
    assert isinstance(policy.jwks_refresh, float)
    assert (policy.redis, policy.redis_on_failure, policy.redis_timeout) == ("", "local", 0.05)
    redis = parse_config({"policy": {"redis": "[::1]:6379", "redis_on_failure": "deny"}}).policy
    assert (redis.redis, redis.redis_on_failure) == ("[::1]:6379", "deny")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("strict", "policy: expected a mapping, got 'strict'"),
        ({"dir": "/x"}, "policy: unknown key(s) dir"),
        ({"directory": ""}, "policy.directory: '' is not a path"),
        ({"directory": ["/x"]}, "policy.directory: ['/x'] is not a path"),
        ({"root_namespace": "Ferry_System"}, "invalid policy.root_namespace 'Ferry_System'"),
        ({"root_namespace": ""}, "invalid policy.root_namespace ''"),
        ({"jwks_refresh": 0}, "policy.jwks_refresh: 0 must be a positive number of seconds"),
        ({"jwks_refresh": "20m"}, "policy.jwks_refresh: '20m' must be a positive number"),
        ({"jwks_timeout": -1}, "policy.jwks_timeout: -1 must be a positive number"),
        ({"jwks_timeout": True}, "policy.jwks_timeout: True must be a positive number"),
        ({"redis": "localhost"}, "policy.redis: 'localhost' is not host:port or a socket path"),
        ({"redis": "127.0.0.1:0"}, "policy.redis: '127.0.0.1:0' is not host:port"),
        ({"redis": 6379}, "policy.redis: 6379 is not host:port"),
        (
            {"redis_on_failure": "open"},
            "policy.redis_on_failure: 'open' is not one of local, allow",
        ),
        ({"redis_timeout": 0}, "policy.redis_timeout: 0 must be a positive number"),
    ],
)
def test_bad_policy_settings_name_the_key(raw: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"policy": raw})
    assert needle in str(info.value)


def test_the_docstring_marks_every_value_as_default_or_example() -> None:
    import agent.config

    doc = agent.config.__doc__ or ""
    yaml_block = doc.split("```yaml\n")[1].split("```")[0]
    for line in yaml_block.splitlines():
        key, _, rest = line.partition(":")
        if not rest.strip() or key.strip().startswith("#"):
            continue  # a section header or a continued comment
        assert "# default" in rest or "# example" in rest, line
