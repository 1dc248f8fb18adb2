"""The policy set in force, and what of it applies to one workload (pure).

`PolicySet` is every valid document in force, as plain data.  It travels from the agent to every
proxy worker as one JSON encoding (`to_json`: `{"documents": [...]}`, each document in its
canonical Kubernetes shape, `agent.policy.documents.encode`); `from_json` validates every
document again (schema and semantics) and refuses the whole set if one fails, so a worker never
runs a policy the agent would have refused.  JSON Schema validation costs about 0.3 ms per
document, so documents that passed are remembered by their canonical JSON text (bounded LRU): a
new version that changes one document of a thousand re-validates that one.

`compile_for(policy, namespace, labels, ...)` picks the documents that select one workload and
compiles them once into a `WorkloadPolicy`: a document selects a workload when it lives in the
workload's namespace or in the root namespace (`policy.root_namespace`, whose documents apply
mesh-wide) and every label of its `selector.matchLabels` is on the workload (no selector: all of
them).  Root-namespace documents come first, then by name; that order only decides which
matching rule a verdict reports, never the decision.  Workloads with the same namespace and
labels get equal results, so a caller may share one `WorkloadPolicy` between them.

`WorkloadPolicy.needs_http(port)` is true when authorization or a rate-limit rule needs request
facts on that port, and on every port as soon as a RequestAuthentication selects the workload
(an invalid token must be refused wherever HTTP flows, as Envoy's jwt_authn does on an HTTP
chain).  Traffic on such a port that turns out not to be HTTP should then be decided at L4
(`facts.http` None), the way Istio's protocol sniffing falls back to its TCP chain.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from agent.policy.authz import AuthorizationPolicy
from agent.policy.authz_engine import WorkloadAuthz
from agent.policy.documents import (
    Document,
    InvalidPolicy,
    Parsed,
    PolicyError,
    RateLimitPolicy,
    RequestAuthentication,
    combine,
    encode,
    parse_document,
)
from agent.policy.jwt import JwtAuthenticator
from agent.policy.ratelimit import WorkloadRateLimits

WIRE = "<policy set>"  # how errors of `from_json` name their "file"

D = TypeVar("D", AuthorizationPolicy, RequestAuthentication, RateLimitPolicy)


def _sorted(documents: Iterable[D]) -> tuple[D, ...]:
    return tuple(sorted(documents, key=lambda d: (d.namespace, d.name)))


@dataclass(frozen=True)
class PolicySet:
    """Every valid document in force, each kind sorted by namespace and name."""

    authorization: tuple[AuthorizationPolicy, ...] = ()
    authentication: tuple[RequestAuthentication, ...] = ()
    rate_limits: tuple[RateLimitPolicy, ...] = ()

    @staticmethod
    def of(documents: Iterable[Document]) -> PolicySet:
        """The set of these documents (as `documents.load_directory` returns them)."""
        documents = list(documents)
        return PolicySet(
            _sorted(d for d in documents if isinstance(d, AuthorizationPolicy)),
            _sorted(d for d in documents if isinstance(d, RequestAuthentication)),
            _sorted(d for d in documents if isinstance(d, RateLimitPolicy)),
        )

    @property
    def documents(self) -> tuple[Document, ...]:
        return (*self.authorization, *self.authentication, *self.rate_limits)

    def to_json(self) -> dict[str, Any]:
        """The one encoding, used on the wire to proxies: `{"documents": [...]}`."""
        return {"documents": [encode(document) for document in self.documents]}

    @staticmethod
    def from_json(raw: Any) -> PolicySet:
        """Decode and validate again (defence in depth); `InvalidPolicy` lists every problem."""
        items = raw.get("documents") if isinstance(raw, dict) else None
        if not isinstance(items, list):
            reason = f"expected {{'documents': [...]}}, got {type(raw).__name__}"
            raise InvalidPolicy([PolicyError(WIRE, "", "", reason)])
        parsed = [(_parse_wire(item, i), WIRE) for i, item in enumerate(items)]
        loaded = combine(parsed)
        if loaded.errors:
            raise InvalidPolicy(loaded.errors)
        return PolicySet.of(loaded.documents)


@lru_cache(maxsize=65536)
def _valid(text: str) -> Document | None:
    """The document a canonical JSON text validates to, None if it does not (remembered)."""
    return parse_document(json.loads(text), file=WIRE, index=0).document


def _parse_wire(item: Any, index: int) -> Parsed:
    """`parse_document` for one decoded wire document, through `_valid` when it passes."""
    document = _valid(json.dumps(item, sort_keys=True, separators=(",", ":")))
    if document is None:  # parse again for the errors, named by position
        return parse_document(item, file=WIRE, index=index)
    return Parsed(document, f"{document.kind} {document.ref}")


@dataclass(frozen=True)
class WorkloadPolicy:
    """Everything that decides for one workload, compiled; immutable, shared by reference."""

    authz: WorkloadAuthz
    jwt: JwtAuthenticator | None  # None when no RequestAuthentication rule selects it
    rate_limits: WorkloadRateLimits | None  # None when no RateLimitPolicy selects it
    policies: tuple[str, ...]  # "<kind> <ns>/<name>" of every document that selects it

    def needs_http(self, port: int) -> bool:
        """True if connections to `port` need HTTP inspection (see the module docstring)."""
        return (
            self.jwt is not None
            or self.authz.needs_http(port)
            or (self.rate_limits is not None and self.rate_limits.needs_http(port))
        )


def selects(document: Document, namespace: str, labels: Mapping[str, str], root: str) -> bool:
    """Whether `document` applies to a workload of `namespace` with `labels`."""
    if document.namespace not in (namespace, root):
        return False
    return all(labels.get(key) == value for key, value in document.selector)


def compile_for(
    policy: PolicySet,
    namespace: str,
    labels: Mapping[str, str],
    *,
    root_namespace: str,
    trust_domain: str,
) -> WorkloadPolicy:
    """Compile the documents that select the workload (namespace, labels)."""

    def chosen(documents: Sequence[D]) -> list[D]:
        picked = [d for d in documents if selects(d, namespace, labels, root_namespace)]
        return sorted(picked, key=lambda d: (d.namespace != root_namespace, d.name))

    authorization = chosen(policy.authorization)
    authentication = chosen(policy.authentication)
    rate_limits = chosen(policy.rate_limits)
    jwt_rules = [rule for document in authentication for rule in document.jwt_rules]
    specs = [(d.namespace, d.name, d.spec) for d in rate_limits]
    documents: list[Document] = [*authorization, *authentication, *rate_limits]
    return WorkloadPolicy(
        authz=WorkloadAuthz(authorization, trust_domain=trust_domain),
        jwt=JwtAuthenticator(jwt_rules) if jwt_rules else None,
        rate_limits=(
            WorkloadRateLimits.from_specs(specs, trust_domain=trust_domain) if specs else None
        ),
        policies=tuple(f"{d.kind} {d.ref}" for d in documents),
    )
