"""Structured fuzzing of the parsers of the agent socket and of files: messages and documents
built field by field, valid shapes with hostile values, through each fuzz target's `check` (its
contract: `fuzz.targets.<name>`).

These complement the byte mutations of `test_corpus.py` and the properties beside the parsers'
unit tests: `tests/unit/test_protocol.py` mutates encoded control messages field by field; its
strategy of every message type is reused here to check the round trip and the session.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import given
from hypothesis import strategies as st

from agent.control.protocol import Message, encode
from agent.proxy import messages as worker
from fuzz.targets import (
    admin_request,
    config,
    control,
    directory,
    enrollments,
    jwks,
    policy_documents,
    policy_set,
    worker_messages,
)
from tests.fuzz.strategies import FUZZ, json_values
from tests.unit.test_protocol import messages as control_messages

NAMES = st.sampled_from(("web", "shop", "a", "A", "-x", "x" * 64, "")) | st.text(max_size=8)
IPS = st.ip_addresses().map(str) | st.sampled_from(("10.0.0.1/8", "::ffff:1.2.3.4", "1.2.3"))
SPIFFE = st.sampled_from(("spiffe://cluster.local/ns/shop/sa/web", "spiffe://td/ns/a", "x"))


def some(value: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """`value` most of the time, anything JSON at times."""
    return value | json_values


@FUZZ
@given(control_messages)
def test_control_messages(message: Message) -> None:
    control.check(encode(message))


_WORKER_MESSAGES = st.one_of(
    st.builds(
        worker.AddWorkload,
        st.integers(),
        NAMES,
        SPIFFE,
        st.sampled_from(("strict", "permissive")),
        st.lists(IPS, max_size=2).map(tuple),
        st.lists(
            st.builds(
                worker.ListenerSpec, st.sampled_from(("inbound", "tunnel")), st.sampled_from((4, 6))
            ),
            max_size=2,
        ).map(tuple),
        NAMES,
        st.dictionaries(NAMES, NAMES, max_size=2),
    ),
    st.builds(
        worker.SetCertificate,
        st.integers(),
        NAMES,
        st.text(max_size=9),
        st.text(max_size=9),
        st.floats(),
    ),
    st.builds(worker.UpdatePolicy, st.integers(), st.integers(), st.booleans(), st.text()),
    st.builds(worker.Done, st.integers(), st.integers(), st.none() | st.text(max_size=9)),
)


@FUZZ
@given(_WORKER_MESSAGES)
def test_worker_messages(message: worker.Message) -> None:
    worker_messages.check(worker.encode(message))


@FUZZ
@given(
    some(st.sampled_from(("node-a", "node-b"))),
    st.lists(
        some(
            st.fixed_dictionaries({"ip": some(IPS), "identity": some(SPIFFE), "node": some(NAMES)})
        ),
        max_size=5,
    ),
)
def test_directory_node_files(node: object, entries: list[object]) -> None:
    directory.check(json.dumps({"node": node, "entries": entries}).encode())


_STRINGS = st.lists(
    st.sampled_from(
        (
            "*",
            "a*",
            "*a",
            "/api/*",
            "/{*}",
            "cluster.local/ns/a/sa/b",
            "10.0.0.0/8",
            "8080",
            "GET",
            "",
        )
    )
    | st.text(max_size=6),
    max_size=3,
)
_SOURCE = st.fixed_dictionaries(
    {},
    optional={
        "principals": _STRINGS,
        "notPrincipals": _STRINGS,
        "namespaces": _STRINGS,
        "ipBlocks": _STRINGS,
        "requestPrincipals": _STRINGS,
        "serviceAccounts": _STRINGS,
    },
)
_OPERATION = st.fixed_dictionaries(
    {},
    optional={
        "methods": _STRINGS,
        "paths": _STRINGS,
        "notPaths": _STRINGS,
        "ports": _STRINGS,
        "hosts": _STRINGS,
    },
)
_CONDITION = st.fixed_dictionaries(
    {
        "key": st.sampled_from(
            (
                "request.headers[x-a]",
                "source.ip",
                "request.auth.claims[groups]",
                "destination.port",
                "connection.sni",
                "x",
            )
        ),
        "values": _STRINGS,
    }
)
_RULE = st.fixed_dictionaries(
    {},
    optional={
        "from": st.lists(st.fixed_dictionaries({"source": _SOURCE}), max_size=2),
        "to": st.lists(st.fixed_dictionaries({"operation": _OPERATION}), max_size=2),
        "when": st.lists(_CONDITION, max_size=2),
    },
)
_SPECS = {
    "AuthorizationPolicy": st.fixed_dictionaries(
        {},
        optional={
            "action": st.sampled_from(("ALLOW", "DENY", "AUDIT", "CUSTOM")),
            "rules": st.lists(_RULE, max_size=3),
            "selector": st.fixed_dictionaries({"matchLabels": st.dictionaries(NAMES, NAMES)}),
        },
    ),
    "RequestAuthentication": st.fixed_dictionaries(
        {
            "jwtRules": st.lists(
                st.fixed_dictionaries(
                    {"issuer": st.sampled_from(("https://i", ""))},
                    optional={
                        "jwksUri": st.sampled_from(("https://i/k", "ftp://x")),
                        "audiences": _STRINGS,
                        "fromHeaders": st.lists(
                            st.fixed_dictionaries({"name": NAMES}, optional={"prefix": NAMES})
                        ),
                        "fromParams": _STRINGS,
                        "timeout": st.sampled_from(("2s", "x")),
                        "outputClaimToHeaders": st.lists(
                            st.fixed_dictionaries({"header": NAMES, "claim": NAMES})
                        ),
                    },
                ),
                max_size=2,
            )
        }
    ),
    "RateLimitPolicy": st.fixed_dictionaries(
        {
            "rules": st.lists(
                st.fixed_dictionaries(
                    {
                        "bucket": st.fixed_dictionaries(
                            {
                                "maxTokens": some(st.integers(-1, 10**6)),
                                "fillInterval": st.sampled_from(("100ms", "1s", "0s", "1h", "x")),
                            }
                        )
                    },
                    optional={
                        "key": st.sampled_from(
                            ("source.ip", "source.principal", "request.headers[a]", "none", "x")
                        ),
                        "scope": st.sampled_from(("local", "global")),
                    },
                ),
                max_size=2,
            )
        }
    ),
}
_KINDS = {
    "AuthorizationPolicy": "security.istio.io/v1",
    "RequestAuthentication": "security.istio.io/v1beta1",
    "RateLimitPolicy": "ferry.dev/v1alpha1",
}


@st.composite
def policy_documents_(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(sorted(_SPECS)))
    metadata = draw(st.fixed_dictionaries({"name": NAMES}, optional={"namespace": NAMES}))
    return {
        "apiVersion": _KINDS[kind],
        "kind": kind,
        "metadata": metadata,
        "spec": draw(some(_SPECS[kind])),
    }


@FUZZ
@given(st.lists(policy_documents_(), min_size=1, max_size=3))
def test_policy_documents(documents: list[dict[str, object]]) -> None:
    policy_documents.check(yaml.dump_all(documents, Dumper=yaml.CSafeDumper).encode())


@FUZZ
@given(st.lists(policy_documents_(), max_size=3))
def test_policy_sets(documents: list[dict[str, object]]) -> None:
    policy_set.check(json.dumps({"documents": documents}).encode())


_B64 = st.binary(min_size=1, max_size=70).map(
    lambda b: (
        json.dumps(b.hex())[1:-1]
        if len(b) % 7 == 0
        else __import__("base64").urlsafe_b64encode(b).rstrip(b"=").decode()
    )
)
_KEY = st.fixed_dictionaries(
    {"kty": st.sampled_from(("RSA", "EC", "OKP", "oct"))},
    optional={
        "crv": st.sampled_from(("P-256", "P-384", "P-521", "Ed25519", "X25519")),
        "x": some(_B64),
        "y": some(_B64),
        "n": some(_B64),
        "e": st.sampled_from(("AQAB", "AA", "")),
        "kid": some(NAMES),
        "alg": st.sampled_from(("RS256", "ES256", "ES384", "EdDSA", "PS256", "HS256")),
        "use": st.sampled_from(("sig", "enc")),
    },
)


@FUZZ
@given(st.lists(some(_KEY), max_size=3))
def test_jwks(keys: list[object]) -> None:
    jwks.check(json.dumps({"keys": keys}).encode())


_SECTIONS = st.fixed_dictionaries(
    {},
    optional={
        "node_name": some(NAMES),
        "redirection": st.dictionaries(
            st.sampled_from(
                ("backend", "outbound_port", "mark", "ipv6", "exclude_outbound_cidrs", "nope")
            ),
            json_values,
        ),
        "proxy": st.dictionaries(
            st.sampled_from(("workers", "connect_timeout", "metrics_address")), json_values
        ),
        "identity": st.dictionaries(
            st.sampled_from(("trust_domain", "workload_cert_ttl")), json_values
        ),
        "mesh": st.dictionaries(
            st.sampled_from(("default_mode", "namespace_modes", "egress")), json_values
        ),
        "policy": st.dictionaries(
            st.sampled_from(("root_namespace", "redis", "jwks_refresh")), json_values
        ),
        "workloads": st.lists(
            st.dictionaries(
                st.sampled_from(("netns", "namespace", "labels", "service_account")), json_values
            )
        ),
    },
)


@FUZZ
@given(_SECTIONS)
def test_config_files(sections: dict[str, object]) -> None:
    config.check(yaml.dump(sections, Dumper=yaml.CSafeDumper).encode())


_WORKLOAD = st.fixed_dictionaries(
    {
        "uid": some(NAMES),
        "name": some(NAMES),
        "netns": some(NAMES),
        "netns_inode": some(st.integers()),
        "namespace": some(NAMES),
        "service_account": some(NAMES),
    },
    optional={
        "mode": some(st.sampled_from(("strict", "permissive"))),
        "ips": some(st.lists(IPS)),
        "netns_dev": some(st.integers()),
        "labels": some(st.dictionaries(NAMES, NAMES)),
    },
)


@FUZZ
@given(some(st.sampled_from((1, 2))), some(st.lists(some(_WORKLOAD), max_size=3)))
def test_enrollment_stores(version: object, workloads: object) -> None:
    enrollments.check(json.dumps({"version": version, "workloads": workloads}).encode())


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            (
                "op",
                "netns",
                "port",
                "from_principal",
                "from_ip",
                "method",
                "path",
                "host",
                "headers",
                "jwt",
            )
        ),
        some(st.integers(0, 70000) | IPS | NAMES),
    )
)
def test_admin_requests(body: dict[str, object]) -> None:
    admin_request.check(json.dumps(body).encode())
