"""Policy documents: YAML loading, the JSON Schemas and Istio's semantic validation, each error
naming the file, the document, the field path and the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from agent.policy.authz import AuthorizationPolicy, Condition, Operation, Rule, Source
from agent.policy.documents import (
    SCHEMA_DIR,
    Loaded,
    PolicyError,
    RateLimitPolicy,
    RequestAuthentication,
    encode,
    load_directory,
    load_files,
    parse_document,
    parse_text,
)

JWKS = json.dumps(
    {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}
)


def ap(spec: Any, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "foo", **metadata},
        "spec": spec,
    }


def problems(raw: Any) -> list[tuple[str, str]]:
    """(field, reason) of every error of one document."""
    return [(e.field, e.reason) for e in parse_document(raw, file="f.yaml", index=0).errors]


def single(raw: Any) -> tuple[str, str]:
    found = problems(raw)
    assert len(found) == 1, found
    return found[0]


# --- the schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["authorizationpolicy", "requestauthentication", "ratelimitpolicy"]
)
def test_schemas_are_draft_2020_12_without_refs(name: str) -> None:
    text = (SCHEMA_DIR / f"{name}.json").read_text()
    schema = json.loads(text)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert "$ref" not in text and "$defs" not in text  # inline: usable as a CRD's OpenAPI schema
    assert set(schema["required"]) >= {"apiVersion", "kind", "metadata"}


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (ap({"action": "MAYBE"}), "spec.action", "'MAYBE' is not one of"),
        (
            ap({"rules": [{"to": [{"operation": {"ports": [80]}}]}]}),
            "spec.rules[0].to[0].operation.ports[0]",
            "80 is not of type 'string'",
        ),
        (
            ap({"rules": [{"from": [{"source": {"notPrinciple": ["a"]}}]}]}),
            "spec.rules[0].from[0].source",
            "'notPrinciple' was unexpected",
        ),
        (
            ap({"rules": [{"from": [{"source": {"principals": [""]}}]}]}),
            "spec.rules[0].from[0].source.principals[0]",
            "should be non-empty",
        ),
        (
            ap({"rules": [{"from": [{}]}]}),
            "spec.rules[0].from[0]",
            "'source' is a required property",
        ),
        (
            ap({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
            "spec.rules[0].to[0].operation.ports[0]",
            "'http' is invalid: a decimal port number",
        ),
        (
            ap({"targetRefs": [{"kind": "Service", "name": "x"}]}),
            "spec",
            "'targetRefs' was unexpected",
        ),
        (
            ap({}, name="Bad_Name"),
            "metadata.name",
            "'Bad_Name' is invalid: must be a DNS subdomain",
        ),
        (ap({}, namespace="a.b"), "metadata.namespace", "'a.b' is invalid: must be a DNS label"),
        (
            {
                "apiVersion": "security.istio.io/v2",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "p"},
            },
            "apiVersion",
            "'security.istio.io/v2' is not one of",
        ),
        (
            {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy"},
            "",
            "'metadata' is a required property",
        ),
        (
            ap({"selector": {"matchLabels": {"app": 1}}}),
            "spec.selector.matchLabels.app",
            "1 is not of type 'string'",
        ),
    ],
)
def test_schema_errors_name_the_field_and_the_value(raw: Any, field: str, reason: str) -> None:
    got_field, got_reason = single(raw)
    assert got_field == field and reason in got_reason


# --- semantics, as Istio's webhook (1.4) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        (
            {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]},
            "spec.action",
            "CUSTOM (external authorization through an extension provider) is not supported",
        ),
        (
            {"action": "DENY", "provider": {"name": "x"}, "rules": [{}]},
            "spec.provider",
            "must not be set with action DENY",
        ),
        ({"action": "DENY"}, "spec.rules", "DENY without `rules` is meaningless"),
        ({"rules": [{"from": []}]}, "spec.rules[0].from", "`from` must not be empty"),
        ({"rules": [{"to": []}]}, "spec.rules[0].to", "`to` must not be empty"),
        (
            {"rules": [{"from": [{"source": {}}]}]},
            "spec.rules[0].from[0].source",
            "`source` must not be empty",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": []}}]}]},
            "spec.rules[0].from[0].source",
            "`source` must not be empty",
        ),
        (
            {"rules": [{"to": [{"operation": {}}]}]},
            "spec.rules[0].to[0].operation",
            "`operation` must not be empty",
        ),
        (
            {"rules": [{"when": [{"key": "source.ip"}]}]},
            "spec.rules[0].when[0]",
            "at least one of `values` or `notValues` must be set for source.ip",
        ),
        (
            {"rules": [{"when": [{"key": "foo.bar", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "unknown attribute: foo.bar",
        ),
        (
            {"rules": [{"when": [{"key": "destination.labels[app]", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "replaced by the workload selector",
        ),
        (
            {"rules": [{"when": [{"key": "destination.namespace", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "replaced by the metadata.namespace",
        ),
        (
            {"rules": [{"when": [{"key": "connection.sni", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "not supported by Ferry",
        ),
        (
            {"rules": [{"when": [{"key": "experimental.envoy.filters.a[b]", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "not supported by Ferry",
        ),
        (
            {"rules": [{"when": [{"key": "request.headers[]", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "should be request.headers[<name>]",
        ),
        (
            {"rules": [{"when": [{"key": "request.auth.claims[a]b]", "values": ["a"]}]}]},
            "spec.rules[0].when[0].key",
            "should be request.auth.claims[<name>]",
        ),
        (
            {"rules": [{"when": [{"key": "source.ip", "values": ["10.0.0.0/33"]}]}]},
            "spec.rules[0].when[0].values[0]",
            "'10.0.0.0/33' is not an CIDR block",
        ),
        (
            {"rules": [{"when": [{"key": "remote.ip", "notValues": ["1.2.3"]}]}]},
            "spec.rules[0].when[0].notValues[0]",
            "'1.2.3' is not an IP address",
        ),
        (
            {"rules": [{"when": [{"key": "destination.port", "values": ["65536"]}]}]},
            "spec.rules[0].when[0].values[0]",
            "'65536' is not a port",
        ),
        (
            {"rules": [{"to": [{"operation": {"notPorts": ["99999"]}}]}]},
            "spec.rules[0].to[0].operation.notPorts[0]",
            "'99999' is not a port",
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/255.0.0.0"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "is not an CIDR block",
        ),
        (
            {"rules": [{"from": [{"source": {"principals": ["a"], "serviceAccounts": ["b"]}}]}]},
            "spec.rules[0].from[0].source",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            {"rules": [{"from": [{"source": {"serviceAccounts": ["ns/*"]}}]}]},
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "wildcards are not supported",
        ),
        (
            {"rules": [{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}]},
            "spec.rules[0].from[0].source.serviceAccounts[0]",
            "is not <namespace>/<service-account>",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/{name}/x{*}"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "is not a supported path template",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/a/{**}/b"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "is not a supported path template",
        ),
        (
            {"rules": [{"to": [{"operation": {"notPaths": ["/a/*/{*}"]}}]}]},
            "spec.rules[0].to[0].operation.notPaths[0]",
            "is not a supported path template",
        ),
        (
            {"selector": {"matchLabels": {"app": "web*"}}},
            "spec.selector.matchLabels[app]",
            "wildcard is not supported in selector: app=web*",
        ),
    ],
)
def test_semantic_errors(spec: Any, field: str, reason: str) -> None:
    got_field, got_reason = single(ap(spec))
    assert got_field == field and reason in got_reason


@pytest.mark.parametrize(
    "spec",
    [
        {},  # allow nothing
        {"rules": [{}]},
        {"action": "DENY", "rules": [{}]},
        {"action": "DENY", "rules": []},  # accepted by Istio (never matches)
        {"action": "AUDIT"},
        {"rules": [{"to": [{"operation": {"paths": ["/api/{*}/x/{**}", "/a*", "*.png", "*"]}}]}]},
        {
            "rules": [
                {
                    "when": [
                        {"key": "request.auth.claims[a][b]", "values": ["x"]},
                        {"key": "request.headers[X-Token]", "notValues": ["*"]},
                        {"key": "destination.port", "values": ["0", "65535"]},
                        {"key": "source.ip", "values": ["fd00::/8", "10.1.2.3"]},
                    ]
                }
            ]
        },
        {"rules": [{"from": [{"source": {"serviceAccounts": ["ns/sa", "sa"]}}]}]},
    ],
)
def test_valid_specs(spec: Any) -> None:
    assert problems(ap(spec)) == []


def test_a_valid_policy_becomes_a_typed_document() -> None:
    raw = ap(
        {
            "selector": {"matchLabels": {"version": "v1", "app": "web"}},
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"notPrincipals": ["a"]}}],
                    "to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}],
                    "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}],
                }
            ],
        }
    )
    assert parse_document(raw, file="f", index=0).document == AuthorizationPolicy(
        name="p",
        namespace="foo",
        selector=(("app", "web"), ("version", "v1")),
        action="DENY",
        rules=(
            Rule(
                sources=(Source(not_principals=("a",)),),
                operations=(Operation(ports=("80",), methods=("GET",)),),
                conditions=(Condition("source.ip", ("10.0.0.0/8",)),),
            ),
        ),
    )


def test_namespace_defaults_to_default_and_nulls_are_absent() -> None:
    raw = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": None},
        "spec": {"rules": None, "selector": None},
    }
    document = parse_document(raw, file="f", index=0).document
    assert document == AuthorizationPolicy("p", "default")


def test_dry_run_annotation_is_refused_unless_false() -> None:
    assert (
        single(ap({}, annotations={"istio.io/dry-run": "true"}))[0]
        == "metadata.annotations[istio.io/dry-run]"
    )
    assert "is not true or false" in single(ap({}, annotations={"istio.io/dry-run": "maybe"}))[1]
    assert problems(ap({}, annotations={"istio.io/dry-run": "false", "other": "x"})) == []


def test_deny_with_http_fields_on_every_port_warns() -> None:
    parsed = parse_document(
        ap({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}),
        file="f",
        index=0,
    )
    assert parsed.errors == () and parsed.document is not None
    assert [w.field for w in parsed.warnings] == ["spec.rules[0]"]
    limited = ap(
        {
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["80"]}}]}],
        }
    )
    assert parse_document(limited, file="f", index=0).warnings == ()


def test_unknown_kind_and_non_mappings() -> None:
    assert single({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}) == (
        "kind",
        "unknown kind 'ConfigMap'; Ferry reads AuthorizationPolicy, RequestAuthentication, "
        "RateLimitPolicy",
    )
    assert single(["a"]) == ("", "expected a mapping (a Kubernetes-style object), got list")


# --- RequestAuthentication and RateLimitPolicy: checked by their engines' own parsers -----------


def ra(rules: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "foo"},
        "spec": {"jwtRules": rules},
    }


def rl(rules: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "rl", "namespace": "foo"},
        "spec": {"rules": rules},
    }


def test_request_authentication() -> None:
    parsed = parse_document(
        ra([{"issuer": "https://issuer", "jwks": JWKS, "audiences": ["a"]}]), file="f", index=0
    )
    assert isinstance(parsed.document, RequestAuthentication)
    assert parsed.document.jwt_rules[0].issuer == "https://issuer"
    assert single(ra([{"issuer": "i", "jwksUri": "ftp://x/jwks"}]))[0] == "spec.jwtRules[0]"
    assert "jwks" in single(ra([{"issuer": "i", "jwks": "{}"}]))[1]
    assert (
        single(ra([{"issuer": "i", "jwks": JWKS, "timeout": "5m"}]))[0]
        == "spec.jwtRules[0].timeout"
    )
    field, reason = single(
        ra(
            [
                {
                    "issuer": "i",
                    "jwks": JWKS,
                    "outputClaimToHeaders": [{"header": "a b", "claim": "c"}],
                }
            ]
        )
    )
    assert (
        field == "spec.jwtRules[0].outputClaimToHeaders[0].header" and "'a b' is invalid" in reason
    )


def test_rate_limit_policy() -> None:
    parsed = parse_document(
        rl(
            [
                {
                    "match": {"ports": [8080]},
                    "key": "request.headers[x-key]",
                    "bucket": {"maxTokens": 5, "fillInterval": "1s"},
                }
            ]
        ),
        file="f",
        index=0,
    )
    assert isinstance(parsed.document, RateLimitPolicy) and parsed.errors == ()
    assert single(rl([{"bucket": {"maxTokens": 1, "fillInterval": "10ms"}}])) == (
        "spec.rules[0].bucket.fillInterval",
        "'10ms' is shorter than 50ms (raise tokensPerFill instead)",
    )
    assert (
        single(rl([{"bucket": {"maxTokens": 0, "fillInterval": "1s"}}]))[0]
        == "spec.rules[0].bucket.maxTokens"
    )
    assert single(rl([{"key": "source.port", "bucket": {"maxTokens": 1, "fillInterval": "1s"}}]))[
        0
    ] == ("spec.rules[0].key")
    assert single(
        rl([{"match": {"ports": [0]}, "bucket": {"maxTokens": 1, "fillInterval": "1s"}}])
    )[0] == ("spec.rules[0].match.ports[0]")
    assert single(rl([]))[0] == "spec.rules"


# --- files and directories ------------------------------------------------------------------


def test_several_documents_per_file_and_errors_name_file_document_field(tmp_path: Path) -> None:
    text = yaml.safe_dump_all(
        [ap({}), None, ap({"action": "DENY"}, name="d"), ap({"rules": [{"from": []}]}, name=None)]
    )
    (tmp_path / "p.yaml").write_text(text)
    loaded = load_files([tmp_path / "p.yaml"])
    assert [d.name for d in loaded.documents] == ["p"]
    file = str(tmp_path / "p.yaml")
    assert [str(e) for e in loaded.errors] == [
        f"{file}: AuthorizationPolicy foo/d: spec.rules: DENY without `rules` is meaningless as it "
        "never "
        "matches; add an empty rule `{}` to deny every request",
        f"{file}: document #4: metadata: 'name' is a required property",
    ]
    assert not loaded.ok


def test_yaml_syntax_error_names_the_document_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(ap({})) + "---\nspec: [unclosed\n")
    loaded = load_files([tmp_path / "bad.yaml"])
    assert len(loaded.documents) == 1
    [error] = loaded.errors
    line = len(yaml.safe_dump(ap({})).splitlines()) + 3  # the line after `spec: [unclosed`
    assert error.document == "document #2"
    assert error.reason.startswith("not valid YAML: ")  # libyaml's words or PyYAML's
    assert error.reason.endswith(f"(line {line}, column 1)")


def test_directory_reads_yaml_and_json_skips_hidden_and_others(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(ap({}, name="a")))
    (tmp_path / "b.json").write_text(json.dumps(ap({}, name="b")))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(ap({}, name="c")))
    (tmp_path / "notes.txt").write_text("not a policy")
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "x.yaml").write_text(yaml.safe_dump(ap({}, name="hidden")))
    (tmp_path / ".hidden.yaml").write_text("{{{")
    (tmp_path / "sub.yaml").mkdir()
    (tmp_path / "link.yaml").symlink_to(tmp_path / "..data" / "x.yaml")  # a ConfigMap mount
    loaded = load_directory(tmp_path)
    assert loaded.errors == ()
    assert sorted(d.name for d in loaded.documents) == ["a", "b", "c", "hidden"]


def test_duplicates_across_files_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(ap({})))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(ap({"rules": [{}]})))
    loaded = load_directory(tmp_path)
    assert [d.name for d in loaded.documents] == ["p"]
    assert [str(e) for e in loaded.errors] == [
        f"{tmp_path / 'b.yaml'}: AuthorizationPolicy foo/p: metadata.name: duplicate: "
        f"also in {tmp_path / 'a.yaml'}"
    ]
    other_kind = {
        **rl([{"bucket": {"maxTokens": 1, "fillInterval": "1s"}}]),
        "metadata": {"name": "p", "namespace": "foo"},
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(other_kind))
    assert load_directory(tmp_path).errors == ()  # same name, other kind


def test_missing_directory_and_unreadable_file_are_errors(tmp_path: Path) -> None:
    assert load_directory(tmp_path / "nope") == Loaded(
        (),
        (PolicyError(str(tmp_path / "nope"), "", "", "not a directory (missing or unreadable)"),),
    )
    [error] = load_files([tmp_path / "gone.yaml"]).errors
    assert str(error) == f"{tmp_path / 'gone.yaml'}: cannot read: No such file or directory"
    (tmp_path / "latin1.yaml").write_bytes(b"kind: \xff\n")
    assert "cannot read" in load_files([tmp_path / "latin1.yaml"]).errors[0].reason


def test_parse_text_skips_empty_documents() -> None:
    assert parse_text("---\n# only a comment\n---\n", "f") == []


# --- encoding ---------------------------------------------------------------------------------


def test_encode_gives_back_an_equal_document() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: AUDIT
  rules:
  - from: [{source: {principals: [a], notIpBlocks: [10.0.0.0/8], serviceAccounts: []}}]
    to: [{operation: {notMethods: [GET], paths: ['/x/{*}']}}]
    when: [{key: 'request.headers[x]', notValues: [y]}]
  - {}
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  jwtRules:
  - {issuer: https://i, jwksUri: https://i/jwks, fromHeaders: [{name: x-jwt, prefix: "Bearer "}],
     forwardOriginalToken: true, outputClaimToHeaders: [{header: x-sub, claim: sub}], timeout: 2s}
---
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: rl, namespace: shop}
spec:
  rules: [{key: source.ip, bucket: {maxTokens: 3, fillInterval: 100ms}}]
"""
    parsed = parse_text(text, "f")
    assert all(p.errors == () for p in parsed)
    for item in parsed:
        assert item.document is not None
        again = parse_document(json.loads(json.dumps(encode(item.document))), file="wire", index=0)
        assert again.document == item.document
