"""One set of name rules: the config, enrollment requests and SPIFFE IDs agree on every name."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import names
from agent.config import ConfigError, parse_config
from agent.identity.spiffe import IdentityError, validate_label, validate_trust_domain
from agent.workloads import EnrollmentError, check_request

# names built from the alphabet that matters, so both sides of every rule get exercised
candidates = st.text(alphabet="ab-.0Z_/", min_size=0, max_size=70) | st.sampled_from(
    ["a" * 63, "a" * 64, ".".join(["a" * 63] * 4), ".".join(["a" * 63] * 4) + "a", "../x"]
)


def accepts(check: Callable[..., object], *args: object) -> bool:
    try:
        check(*args)
    except ValueError:
        return False
    return True


@given(candidates)
def test_namespaces_and_service_accounts_follow_one_rule(value: str) -> None:
    expected = accepts(names.dns_label, "namespace", value)
    assert accepts(validate_label, "namespace", value) == expected
    assert accepts(check_request, value, "web", None) == expected
    assert accepts(check_request, "shop", value, None) == expected
    workload = {"netns": "web", "namespace": value, "service_account": "web"}
    assert accepts(parse_config, {"workloads": [workload]}) == expected


@given(candidates)
def test_trust_domains_and_node_names_follow_one_rule(value: str) -> None:
    expected = accepts(names.dns_subdomain, "name", value)
    assert accepts(validate_trust_domain, value) == expected
    assert accepts(parse_config, {"identity": {"trust_domain": value}}) == expected
    assert accepts(parse_config, {"node_name": value}) == expected


@pytest.mark.parametrize(
    ("check", "value", "error", "needle"),
    [
        (lambda v: names.dns_label("namespace", v), "Shop", names.InvalidName, "'Shop'"),
        (lambda v: names.trust_domain(v), "a..b", names.InvalidName, "trust domain 'a..b'"),
        (lambda v: names.node_name(v), "../x", names.InvalidName, "node name '../x'"),
        (lambda v: validate_trust_domain(v), "EX.org", IdentityError, "'EX.org'"),
        (lambda v: check_request(v, "web", None), "a_b", EnrollmentError, "'a_b'"),
        (lambda v: parse_config({"identity": {"trust_domain": v}}), "-a", ConfigError, "'-a'"),
    ],
)
def test_errors_name_the_bad_value(
    check: Callable[[str], object], value: str, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=needle):
        check(value)
