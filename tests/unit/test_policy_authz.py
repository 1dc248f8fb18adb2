"""The authorization engine as a decision table: Istio's semantics, its documented examples, the
`not*` and missing-attribute cases, L4 against HTTP, trust-domain aliasing and the matchers."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from agent.policy.authz import NO_ALLOW_MATCH, NO_POLICY, AuthorizationPolicy, Verdict
from agent.policy.authz_engine import WorkloadAuthz
from agent.policy.authz_match import (
    CidrTable,
    claim_values,
    namespace_matcher,
    path_matcher,
    principal_matcher,
    string_matcher,
)
from agent.policy.documents import parse_document
from agent.policy.facts import Facts, HttpFacts, JwtFacts

TD = "cluster.local"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
DEV = "spiffe://cluster.local/ns/dev/sa/app"
FOO = "spiffe://cluster.local/ns/foo/sa/app"
GOOGLE = JwtFacts("https://accounts.google.com/u1", (), "", {"iss": "https://accounts.google.com"})


def policy(text: str, namespace: str = "foo") -> AuthorizationPolicy:
    """One AuthorizationPolicy from YAML (its spec only, or a whole document)."""
    raw: dict[str, Any] = yaml.safe_load(text)
    if "spec" not in raw:
        raw = {"spec": raw}
    raw.setdefault("apiVersion", "security.istio.io/v1")
    raw.setdefault("kind", "AuthorizationPolicy")
    raw.setdefault("metadata", {"name": "p", "namespace": namespace})
    parsed = parse_document(raw, file="test", index=0)
    assert parsed.errors == (), parsed.errors
    assert isinstance(parsed.document, AuthorizationPolicy)
    return parsed.document


def authz(*texts: str, trust_domain: str = TD) -> WorkloadAuthz:
    policies = [
        policy(f"metadata: {{name: p{i}, namespace: foo}}\nspec:\n{indent(t)}")
        for i, t in enumerate(texts)
    ]
    return WorkloadAuthz(policies, trust_domain=trust_domain)


def indent(text: str) -> str:
    return "\n".join("  " + line for line in text.strip("\n").splitlines())


def conn(principal: str = "", ip: str = "10.0.0.1", port: int = 80, dst: str = "10.1.0.1") -> Facts:
    return Facts(principal, ip, dst, port)


def req(
    method: str = "GET",
    path: str = "/",
    host: str = "httpbin.foo",
    headers: dict[str, str] | None = None,
    jwt: JwtFacts | None = None,
    principal: str = "",
    ip: str = "10.0.0.1",
    port: int = 80,
) -> Facts:
    return Facts(principal, ip, "10.1.0.1", port, HttpFacts(method, path, host, headers or {}, jwt))


def allowed(engine: WorkloadAuthz, facts: Facts) -> bool:
    return engine.decide(facts).allowed


# --- the algorithm (1.2, 1.4) ---------------------------------------------------------------


def test_no_policy_allows_everything_with_a_shared_verdict() -> None:
    engine = WorkloadAuthz([], trust_domain=TD)
    assert engine.decide(conn()) is NO_POLICY
    assert engine.decide(req()) == Verdict(True, "", None, "", "no_policy")
    assert not engine.needs_http(80)


def test_allow_nothing_spec_empty_denies_everything() -> None:
    engine = authz("{}")
    assert engine.decide(conn(SLEEP)) == NO_ALLOW_MATCH
    assert engine.decide(req()) == Verdict(False, "", None, "ALLOW", "no_allow_match")
    assert engine.allow_refs == "foo/p0"  # what a 403 names when no ALLOW rule matched
    assert authz("action: DENY\nrules: [{}]", "{}", "{}").allow_refs == "foo/p1,foo/p2"


def test_allow_all_empty_rule_allows_everything() -> None:
    engine = authz("rules: [{}]")
    assert engine.decide(conn()) == Verdict(True, "foo/p0", 0, "ALLOW", "allowed_by_policy")
    assert allowed(engine, req(method="DELETE"))


def test_deny_all_empty_rule_denies_everything_and_beats_allow_all() -> None:
    engine = authz("rules: [{}]", "action: DENY\nrules: [{}]")
    assert engine.decide(conn(SLEEP)) == Verdict(False, "foo/p1", 0, "DENY", "denied_by_policy")
    assert engine.decide(req()).reason == "denied_by_policy"


def test_deny_that_does_not_match_leaves_the_default_allow() -> None:
    engine = authz("action: DENY\nrules: [{to: [{operation: {ports: ['22']}}]}]")
    assert engine.decide(conn(port=80)) is NO_POLICY
    assert engine.decide(conn(port=22)).reason == "denied_by_policy"


def test_allow_rules_with_an_empty_rules_list_match_nothing() -> None:
    assert not allowed(authz("rules: []"), conn())


def test_audit_never_decides_but_is_reported() -> None:
    engine = authz(
        "action: AUDIT\nrules: [{to: [{operation: {ports: ['80']}}]}]",
        "action: AUDIT\nrules: [{from: [{source: {ipBlocks: ['10.0.0.0/8']}}]}]",
        "action: AUDIT\nrules: [{to: [{operation: {ports: ['81']}}]}]",
    )
    verdict = engine.decide(conn(port=80))
    assert verdict == Verdict(True, "", None, "", "no_policy", audit=("foo/p0", "foo/p1"))
    assert engine.decide(conn(port=81, ip="192.168.0.1")).audit == ("foo/p2",)
    assert engine.decide(conn(port=82, ip="192.168.0.1")) is NO_POLICY


def test_audit_is_reported_alongside_a_deny_and_an_allow() -> None:
    engine = authz(
        "action: AUDIT\nrules: [{}]",
        "action: DENY\nrules: [{to: [{operation: {ports: ['22']}}]}]",
        "rules: [{}]",
    )
    assert engine.decide(conn(port=22)) == Verdict(
        False, "foo/p1", 0, "DENY", "denied_by_policy", audit=("foo/p0",)
    )
    assert engine.decide(conn(port=80)).audit == ("foo/p0",)


def test_the_first_matching_rule_in_policy_order_is_reported() -> None:
    engine = authz(
        "rules: [{to: [{operation: {ports: ['9']}}]}, {from: [{source: {namespaces: [dev]}}]}]",
        "rules: [{from: [{source: {principals: ['cluster.local/ns/dev/sa/app']}}]}]",
        "rules: [{}]",
    )
    assert engine.decide(conn(DEV)).policy == "foo/p0" and engine.decide(conn(DEV)).rule == 1
    assert engine.decide(conn(FOO)).policy == "foo/p2"
    assert engine.decide(conn(FOO, port=9)) == Verdict(
        True, "foo/p0", 0, "ALLOW", "allowed_by_policy"
    )


# --- rule algebra (1.3) -----------------------------------------------------------------------

TWO_BY_TWO = """
rules:
- from: [{source: {namespaces: [dev]}}, {source: {ipBlocks: [192.168.0.0/16]}}]
  to: [{operation: {ports: ['80']}}, {operation: {ports: ['443']}}]
  when: [{key: destination.ip, values: [10.1.0.0/16]}]
"""


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (conn(DEV, port=80), True),
        (conn(DEV, port=443), True),
        (conn("", ip="192.168.1.1", port=443), True),  # from and to combine freely (not pairwise)
        (conn(DEV, port=8080), False),  # no `to` matches
        (conn(FOO, port=80), False),  # no `from` matches
        (conn(DEV, port=80, dst="10.2.0.1"), False),  # `when` is ANDed with everything
    ],
)
def test_from_or_to_or_when_and(facts: Facts, expected: bool) -> None:
    assert allowed(authz(TWO_BY_TWO), facts) is expected


def test_fields_of_a_source_are_anded_and_values_ored() -> None:
    engine = authz("rules: [{from: [{source: {namespaces: [dev, foo], ipBlocks: [10.0.0.0/8]}}]}]")
    assert allowed(engine, conn(DEV)) and allowed(engine, conn(FOO))
    assert not allowed(engine, conn(DEV, ip="192.168.0.1"))


def test_two_rules_are_an_or_the_classic_mistake() -> None:
    """`- from:` and `- to:` as two list items are two rules: either is enough."""
    engine = authz(
        "rules:\n- from: [{source: {namespaces: [dev]}}]\n- to: [{operation: {ports: ['80']}}]"
    )
    assert allowed(engine, conn(FOO, port=80)) and allowed(engine, conn(DEV, port=22))
    assert not allowed(engine, conn(FOO, port=22))


# --- not* and missing attributes (1.5) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "facts", "expected"),
    [
        # a positive list never matches what is absent, a negative list always does
        ("rules: [{from: [{source: {principals: ['*']}}]}]", conn(""), False),
        ("rules: [{from: [{source: {principals: ['*']}}]}]", conn(SLEEP), True),
        ("rules: [{from: [{source: {notNamespaces: [x]}}]}]", conn(""), True),  # plaintext admitted
        ("rules: [{from: [{source: {notNamespaces: [dev]}}]}]", conn(DEV), False),
        ("action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]", conn(""), False),
        ("action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]", conn(SLEEP), True),
        (
            "rules: [{from: [{source: {principals: ['cluster.local/ns/*'], notPrincipals: ["
            "'cluster.local/ns/dev/sa/app']}}]}]",
            conn(DEV),
            False,
        ),
        (
            "rules: [{from: [{source: {principals: ['cluster.local/ns/*'], notPrincipals: ["
            "'cluster.local/ns/dev/sa/app']}}]}]",
            conn(FOO),
            True,
        ),
        ("rules: [{to: [{operation: {notPorts: ['22']}}]}]", conn(port=22), False),
        ("rules: [{to: [{operation: {notPorts: ['22']}}]}]", conn(port=23), True),
        ("rules: [{when: [{key: source.ip, notValues: [10.0.0.0/8]}]}]", conn(ip="11.0.0.1"), True),
        (
            "rules: [{when: [{key: source.ip, notValues: [10.0.0.0/8]}]}]",
            conn(ip="10.0.0.1"),
            False,
        ),
        # no JWT: request principal absent
        ("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]", req(), False),
        ("rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", req(), True),
        ("rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", req(jwt=GOOGLE), False),
        ("rules: [{when: [{key: 'request.headers[x-a]', notValues: [b]}]}]", req(), True),
        ("rules: [{when: [{key: 'request.headers[x-a]', values: ['*']}]}]", req(), False),
        ("rules: [{when: [{key: 'request.auth.claims[groups]', notValues: [g]}]}]", req(), True),
    ],
)
def test_not_fields_and_missing_attributes(spec: str, facts: Facts, expected: bool) -> None:
    assert allowed(authz(spec), facts) is expected


def test_deny_requests_without_jwt_istio_example() -> None:
    engine = authz("action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]")
    assert not allowed(engine, req())
    assert allowed(engine, req(jwt=GOOGLE))
    no_subject = JwtFacts("", (), "", {"iss": "https://accounts.google.com"})
    assert not allowed(engine, req(jwt=no_subject))  # `*` needs both iss and sub


def test_disable_jwt_for_healthz_as_documented_denies_healthz() -> None:
    """[DISAGREE] in the semantics note: the concepts page example does not exempt /healthz."""
    documented = authz(
        "rules: [{to: [{operation: {notPaths: [/healthz]}}], "
        "from: [{source: {requestPrincipals: ['*']}}]}]"
    )
    assert not allowed(documented, req(path="/healthz"))
    assert allowed(documented, req(path="/x", jwt=GOOGLE))
    fixed = authz(
        "rules: [{to: [{operation: {notPaths: [/healthz]}}], from: [{source: "
        "{requestPrincipals: ['*']}}]}, {to: [{operation: {paths: [/healthz]}}]}]"
    )
    assert allowed(fixed, req(path="/healthz"))
    assert not allowed(fixed, req(path="/x"))


# --- Istio's documented examples --------------------------------------------------------------

HTTPBIN = """
selector: {matchLabels: {app: httpbin, version: v1}}
action: ALLOW
rules:
- from:
  - source: {principals: [cluster.local/ns/default/sa/sleep]}
  - source: {namespaces: [dev]}
  to:
  - operation: {methods: [GET]}
  when:
  - key: request.auth.claims[iss]
    values: [https://accounts.google.com]
"""


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (req(principal=SLEEP, jwt=GOOGLE), True),
        (req(principal=DEV, jwt=GOOGLE), True),
        (req(principal=FOO, jwt=GOOGLE), False),  # neither source
        (req(principal=SLEEP, method="POST", jwt=GOOGLE), False),  # not GET
        (req(principal=SLEEP), False),  # no token
        (req(principal=SLEEP, jwt=JwtFacts("i/s", (), "", {"iss": "https://evil"})), False),
        (conn(SLEEP), False),  # at L4 the ALLOW rule with HTTP fields is dropped
    ],
)
def test_istio_httpbin_allow_example(facts: Facts, expected: bool) -> None:
    assert allowed(authz(HTTPBIN), facts) is expected


def test_istio_deny_not_namespace_example() -> None:
    engine = authz("action: DENY\nrules: [{from: [{source: {notNamespaces: [foo]}}]}]")
    assert allowed(engine, conn(FOO))
    assert not allowed(engine, conn(DEV))
    assert not allowed(engine, conn(""))  # plaintext has no namespace: "not foo"


def test_istio_get_info_and_post_data_example() -> None:
    engine = authz("""
rules:
- from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
  to:
  - operation: {methods: [GET], paths: ["/info*"]}
  - operation: {methods: [POST], paths: [/data]}
""")
    assert allowed(engine, req("GET", "/info/a", principal=SLEEP))
    assert allowed(engine, req("POST", "/data", principal=SLEEP))
    assert not allowed(engine, req("POST", "/info", principal=SLEEP))
    assert not allowed(engine, req("GET", "/data", principal=SLEEP))
    assert not allowed(engine, req("GET", "/info", principal=DEV))


def test_istio_request_header_condition_example() -> None:
    engine = authz("rules: [{when: [{key: 'request.headers[version]', values: [v1, v2]}]}]")
    assert allowed(engine, req(headers={"version": "v2"}))
    assert not allowed(engine, req(headers={"version": "v3"}))


def test_istio_require_jwt_request_principal_example() -> None:
    engine = authz(
        "rules: [{from: [{source: {requestPrincipals: "
        "[testing@secure.istio.io/testing@secure.istio.io]}}]}]"
    )
    token = JwtFacts("testing@secure.istio.io/testing@secure.istio.io", (), "", {})
    assert allowed(engine, req(jwt=token))
    assert not allowed(engine, req(jwt=GOOGLE))


# --- L4 against HTTP (1.13) --------------------------------------------------------------------


def test_l4_allow_rule_with_http_fields_is_dropped_and_the_policy_still_denies() -> None:
    engine = authz("rules: [{to: [{operation: {ports: ['80'], methods: [GET]}}]}]")
    assert engine.decide(conn(port=80)) == NO_ALLOW_MATCH
    assert allowed(engine, req(port=80))
    assert engine.needs_http(80) and not engine.needs_http(81)


def test_l4_allow_keeps_its_other_rules() -> None:
    engine = authz(
        "rules: [{to: [{operation: {paths: [/a]}}]}, {from: [{source: {namespaces: [dev]}}]}]"
    )
    assert allowed(engine, conn(DEV)) and not allowed(engine, conn(FOO))
    assert allowed(engine, req(path="/a", principal=FOO))


def test_l4_deny_with_only_http_fields_denies_all_tcp_in_scope() -> None:
    engine = authz("action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]")
    assert not allowed(engine, conn(port=5432))  # the safe sidecar behaviour
    assert allowed(engine, req("GET"))  # HTTP is decided per request
    assert not allowed(engine, req("POST"))
    assert engine.needs_http(5432)


def test_l4_deny_drops_only_the_http_fields() -> None:
    engine = authz(
        "action: DENY\nrules: [{from: [{source: {namespaces: [dev], requestPrincipals: ['*']}}], "
        "to: [{operation: {ports: ['8080'], paths: [/admin]}}], "
        "when: [{key: 'request.headers[x]', values: [y]}]}]"
    )
    assert not allowed(engine, conn(DEV, port=8080))
    assert allowed(engine, conn(FOO, port=8080)) and allowed(engine, conn(DEV, port=80))
    assert not engine.needs_http(80) and engine.needs_http(8080)


def test_needs_http_follows_the_operations_that_use_http() -> None:
    engine = authz(
        "rules: [{to: [{operation: {ports: ['80'], methods: [GET]}}, "
        "{operation: {ports: ['9000']}}]}]"
    )
    assert engine.needs_http(80) and not engine.needs_http(9000)
    engine = authz(
        "rules: [{from: [{source: {requestPrincipals: ['*']}}], "
        "to: [{operation: {ports: ['81']}}]}]"
    )
    assert engine.needs_http(81) and not engine.needs_http(80)
    engine = authz(
        "rules: [{to: [{operation: {methods: [GET]}}], "
        "when: [{key: destination.port, values: ['82']}]}]"
    )
    assert engine.needs_http(82) and not engine.needs_http(80)
    engine = authz("action: AUDIT\nrules: [{to: [{operation: {paths: [/x]}}]}]")
    assert engine.needs_http(1)  # every action counts
    assert not authz("rules: [{to: [{operation: {ports: ['80']}}]}]").needs_http(80)


# --- matching (1.6-1.12) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "value", "expected"),
    [
        (["abc"], "abc", True),
        (["abc"], "abcd", False),
        (["abc*"], "abc", True),
        (["abc*"], "abcd", True),
        (["*abc"], "xabc", True),
        (["*abc"], "abc", True),
        (["*abc"], "abcx", False),
        (["*"], "x", True),
        (["*"], "", False),
        (["a*b"], "a*b", True),  # a middle `*` is literal
        (["a*b"], "axb", False),
        (["x", "y*"], "yz", True),
    ],
)
def test_string_patterns(patterns: list[str], value: str, expected: bool) -> None:
    assert string_matcher(patterns)(value) is expected


def test_star_is_presence_for_headers_hosts_methods() -> None:
    assert string_matcher(["*"], star_means_present=True)("")
    engine = authz("rules: [{when: [{key: 'request.headers[x-empty]', values: ['*']}]}]")
    assert allowed(engine, req(headers={"x-empty": ""}))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", True),
        ("EXAMPLE.com", True),  # case-insensitive
        ("example.com:443", False),  # the port is not stripped
        ("api.example.org:8080", True),
        ("", False),
    ],
)
def test_hosts(host: str, expected: bool) -> None:
    engine = authz("rules: [{to: [{operation: {hosts: [Example.COM, '*.example.org:8080']}}]}]")
    assert allowed(engine, req(host=host)) is expected


def test_methods_are_case_sensitive() -> None:
    engine = authz("rules: [{to: [{operation: {methods: [GET]}}]}]")
    assert allowed(engine, req("GET")) and not allowed(engine, req("get"))


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/data", "/data", True),
        ("/data", "/data/", False),  # no trailing-slash magic
        ("/admin*", "/administrator", True),
        ("/ADMIN", "/admin", False),  # case-sensitive
        ("*.png", "/a/b.png", True),
        ("*", "/", True),
        ("/foo/{*}/bar", "/foo/x/bar", True),
        ("/foo/{*}/bar", "/foo/x/y/bar", False),
        ("/foo/{*}/bar", "/foo//bar", False),
        ("/foo/{**}", "/foo/a/b/c", True),
        ("/foo/{**}", "/foo/", True),
        ("/foo/{**}", "/foobar", False),
        ("/{*}/x.{*}", "/a/x.json", True),
        ("/a.b/{*}", "/aXb/c", False),  # literal parts are escaped
    ],
)
def test_paths(pattern: str, path: str, expected: bool) -> None:
    assert path_matcher([pattern])(path) is expected


@pytest.mark.parametrize(
    ("pattern", "principal", "expected"),
    [
        ("cluster.local/ns/default/sa/sleep", SLEEP, True),
        ("cluster.local/ns/default/*", SLEEP, True),
        ("*/sa/sleep", SLEEP, True),
        ("*/sa/sleep", "other://x/sa/sleep", False),  # the suffix form is spiffe:// + .* + suffix
        ("*", SLEEP, True),
        ("cluster.local/ns/default/sa/sleep", "cluster.local/ns/default/sa/sleep", False),
    ],
)
def test_principals_compare_with_spiffe_prepended(
    pattern: str, principal: str, expected: bool
) -> None:
    assert principal_matcher([pattern], TD)(principal) is expected


def test_trust_domain_aliasing() -> None:
    """A policy written for `cluster.local` means the configured trust domain."""
    engine = authz(
        "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]",
        trust_domain="example.org",
    )
    assert allowed(engine, conn("spiffe://example.org/ns/default/sa/sleep"))
    assert not allowed(engine, conn(SLEEP))
    other = authz(
        "rules: [{from: [{source: {principals: [other.org/ns/default/sa/sleep]}}]}]",
        trust_domain="example.org",
    )
    assert allowed(other, conn("spiffe://other.org/ns/default/sa/sleep"))
    assert not allowed(other, conn("spiffe://example.org/ns/default/sa/sleep"))
    wild = authz(
        "rules: [{from: [{source: {principals: ['*/ns/default/sa/sleep']}}]}]",
        trust_domain="example.org",
    )
    assert allowed(wild, conn("spiffe://any.org/ns/default/sa/sleep"))
    when = authz(
        "rules: [{when: [{key: source.principal, values: [cluster.local/ns/dev/sa/app]}]}]",
        trust_domain="example.org",
    )
    assert allowed(when, conn("spiffe://example.org/ns/dev/sa/app"))


@pytest.mark.parametrize(
    ("patterns", "namespace", "expected"),
    [
        (["dev"], "dev", True),
        (["dev"], "devx", False),
        (["dev*"], "devx", True),
        (["*-prod"], "shop-prod", True),
        (["a*c"], "abc", True),
        (["*"], "x", True),
    ],
)
def test_namespaces(patterns: list[str], namespace: str, expected: bool) -> None:
    assert namespace_matcher(patterns)(namespace) is expected


def test_namespaces_need_a_peer_identity() -> None:
    engine = authz("rules: [{from: [{source: {namespaces: ['*']}}]}]")
    assert allowed(engine, conn(DEV))
    assert not allowed(engine, conn(""))
    assert not allowed(engine, conn("spiffe://td/not/a/workload"))


def test_service_accounts() -> None:
    engine = authz("rules: [{from: [{source: {serviceAccounts: [dev/app, sleep]}}]}]")
    assert allowed(engine, conn(DEV))
    assert allowed(engine, conn("spiffe://cluster.local/ns/foo/sa/sleep"))  # bare: policy's ns
    assert not allowed(engine, conn(SLEEP))  # sleep, but in default
    negative = authz("rules: [{from: [{source: {notServiceAccounts: [dev/app]}}]}]")
    assert not allowed(negative, conn(DEV)) and allowed(negative, conn(""))


@pytest.mark.parametrize(
    ("spec", "facts", "expected"),
    [
        ("from: [{source: {ipBlocks: [10.0.0.0/8, 192.168.1.7]}}]", conn(ip="10.9.9.9"), True),
        ("from: [{source: {ipBlocks: [10.0.0.0/8, 192.168.1.7]}}]", conn(ip="192.168.1.7"), True),
        ("from: [{source: {ipBlocks: [10.0.0.0/8, 192.168.1.7]}}]", conn(ip="192.168.1.8"), False),
        ("from: [{source: {ipBlocks: ['10.0.0.1/8']}}]", conn(ip="10.2.0.1"), True),  # host bits
        ("from: [{source: {ipBlocks: ['fd00::/8']}}]", conn(ip="fd12::1"), True),
        ("from: [{source: {ipBlocks: ['fd00::/8']}}]", conn(ip="10.0.0.1"), False),
        ("from: [{source: {ipBlocks: [10.0.0.0/8]}}]", conn(ip="::ffff:10.0.0.1"), True),
        ("from: [{source: {ipBlocks: [10.0.0.0/8]}}]", conn(ip=""), False),
        ("from: [{source: {notIpBlocks: [10.0.0.0/8]}}]", conn(ip=""), True),
        ("from: [{source: {remoteIpBlocks: [10.0.0.0/8]}}]", conn(ip="10.0.0.1"), True),
        ("when: [{key: remote.ip, values: [10.0.0.0/8]}]", conn(ip="11.0.0.1"), False),
        ("when: [{key: destination.ip, values: [10.1.0.0/16]}]", conn(), True),
        ("when: [{key: destination.port, values: ['80', '443']}]", conn(port=443), True),
        ("when: [{key: destination.port, notValues: ['80']}]", conn(port=80), False),
        ("when: [{key: source.namespace, values: [dev]}]", conn(DEV), True),
        ("when: [{key: source.principal, values: ['*']}]", conn(""), False),
    ],
)
def test_l4_attributes(spec: str, facts: Facts, expected: bool) -> None:
    assert allowed(authz(f"rules: [{{{spec}}}]"), facts) is expected


def jwt(
    claims: dict[str, Any], principal: str = "iss/sub", aud: tuple[str, ...] = (), azp: str = ""
) -> JwtFacts:
    return JwtFacts(principal, aud, azp, claims)


@pytest.mark.parametrize(
    ("key", "values", "token", "expected"),
    [
        ("request.auth.claims[groups]", ["admin"], jwt({"groups": ["dev", "admin"]}), True),
        ("request.auth.claims[groups]", ["admin"], jwt({"groups": "admin"}), True),
        ("request.auth.claims[groups]", ["adm*"], jwt({"groups": ["x", "admin"]}), True),
        ("request.auth.claims[groups]", ["admin"], jwt({"groups": [1, True]}), False),
        ("request.auth.claims[admin]", ["true"], jwt({"admin": True}), False),  # not a string
        ("request.auth.claims[n]", ["1"], jwt({"n": 1}), False),
        ("request.auth.claims[a][b]", ["c"], jwt({"a": {"b": "c"}}), True),
        ("request.auth.claims[a][b]", ["c"], jwt({"a": "b"}), False),
        ("request.auth.claims[a.b]", ["c"], jwt({"a.b": "c", "a": {"b": "x"}}), True),
        ("request.auth.claims[scope]", ["write"], jwt({"scope": "read write"}), True),
        ("request.auth.claims[permission]", ["x"], jwt({"permission": "x y"}), True),
        ("request.auth.claims[other]", ["write"], jwt({"other": "read write"}), False),
        ("request.auth.claims[iss]", ["*"], None, False),
        ("request.auth.principal", ["iss/*"], jwt({}), True),
        ("request.auth.principal", ["*/sub"], jwt({}), True),
        ("request.auth.principal", ["is*"], jwt({}), True),
        ("request.auth.principal", ["*"], jwt({}, principal=""), False),
        ("request.auth.audiences", ["api"], jwt({}, aud=("web", "api")), True),
        ("request.auth.audiences", ["api"], jwt({}), False),
        ("request.auth.presenter", ["cli*"], jwt({}, azp="client-1"), True),
        ("request.auth.presenter", ["*"], jwt({}), False),
    ],
)
def test_jwt_conditions(
    key: str, values: list[str], token: JwtFacts | None, expected: bool
) -> None:
    engine = authz(f"rules: [{{when: [{{key: '{key}', values: {values}}}]}}]")
    assert allowed(engine, req(jwt=token)) is expected


def test_claim_values() -> None:
    assert claim_values({"a": {"b": ["x", 2, "y"]}}, ("a", "b")) == ("x", "y")
    assert claim_values({"scope": "a  b"}, ("scope",)) == ("a", "b")
    assert claim_values({"a": None}, ("a",)) is None
    assert claim_values({}, ("a",)) is None


def test_cidr_table_finds_every_block_holding_an_address() -> None:
    table = CidrTable(
        [("10.0.0.0/8", "a"), ("10.1.0.0/16", "b"), ("10.1.0.0/16", "c"), ("::/0", "d")]
    )
    assert sorted(x for items in table.find((4, 0x0A010203)) for x in items) == ["a", "b", "c"]
    assert [x for items in table.find((6, 1)) for x in items] == ["d"]
    assert (4, 0x0B000000) not in table
    assert (4, 0x0A000001) not in CidrTable([])


# --- the index returns what a scan would -------------------------------------------------------


def test_index_by_port_principal_namespace_ip_and_general() -> None:
    rules = "\n".join(
        [
            "- {from: [{source: {principals: [cluster.local/ns/a/sa/a]}}], "
            "to: [{operation: {ports: ['1']}}]}",
            "- {from: [{source: {namespaces: [b]}}]}",
            "- {from: [{source: {ipBlocks: [10.0.0.0/8]}}, "
            "{source: {principals: [cluster.local/ns/c/sa/c]}}]}",
            "- {from: [{source: {principals: ['cluster.local/ns/d/*']}}], "
            "to: [{operation: {ports: ['2']}}]}",
        ]
    )
    engine = authz(f"rules:\n{rules}")
    a, b, c, d = (f"spiffe://cluster.local/ns/{x}/sa/{x}" for x in "abcd")
    ip = "192.168.0.1"
    assert engine.decide(conn(a, ip=ip, port=1)).rule == 0
    assert not allowed(engine, conn(a, ip=ip, port=2))
    assert engine.decide(conn(b, ip=ip, port=7)).rule == 1
    assert engine.decide(conn(c, ip=ip, port=7)).rule == 2
    assert engine.decide(conn("", ip="10.0.0.5", port=7)).rule == 2
    assert engine.decide(conn(d, ip=ip, port=2)).rule == 3
    assert not allowed(engine, conn(d, ip=ip, port=1))
    assert engine.decide(conn(b, ip="10.0.0.5", port=1)).rule == 1  # the first of two matches
