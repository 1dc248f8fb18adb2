"""The policy a `bench.policy` row applies, and Envoy's equivalent of it (pure config).

A row's policy is plain data (`Policy`): ALLOW rules at L4 (`L4Rule`: source IP blocks and
destination ports), ALLOW rules on HTTP requests (`HttpRule`: methods and paths, optionally a
request principal of an issuer), JWT validation (`Jwt`: issuer, audiences, inline JWKS) and a
local rate limit (`RateLimit`: one token bucket for every request, plus a tiny one on a probe
path to prove the filter is on).  `bench.policy` renders it as Ferry's policy documents (Istio's
AuthorizationPolicy and RequestAuthentication, Ferry's RateLimitPolicy); this module renders it as
the filters of Envoy's inbound listener in the server pod, as Istio would program a sidecar:

- L4 rules: the network filter ``envoy.filters.network.rbac`` (action ALLOW, one RBAC policy per
  rule, named ``rule-0000``, ``rule-0001``, ... in rule order: Envoy keeps its policies in a map
  ordered by name and tries them in that order; a rule's principals are ``direct_remote_ip``
  prefixes, what Istio makes of ``ipBlocks``, and its permissions ``destination_port``s) before
  the ``tcp_proxy`` to the ORIGINAL_DST cluster;
- anything HTTP: an ``http_connection_manager`` whose route sends every request to the same
  ORIGINAL_DST cluster (the original destination of the downstream connection) through
  ``envoy.filters.http.router``, with, in Istio's order, ``envoy.filters.http.jwt_authn`` (one
  provider, ``local_jwks`` inline, the payload in dynamic metadata, a token required to be valid
  if present: ``requires_any`` of the provider and ``allow_missing``, exactly Istio's
  RequestAuthentication), ``envoy.filters.http.rbac`` (methods as ``:method`` header matches,
  paths as ``url_path``; a request principal ``<issuer>/*`` as the JWT payload's ``iss`` equal
  to the issuer and ``sub`` present) and ``envoy.filters.http.local_ratelimit``
  (``filter_enabled`` and ``filter_enforced`` 100 %, the bucket on the filter, the probe path's
  tiny bucket on its own route).

The connection manager is told not to generate ``x-request-id`` and not to add ``x-envoy-*``
headers (neither has a Ferry counterpart, and both cost Envoy time: this only favours Envoy), and
normalizes paths (``normalize_path``, ``merge_slashes``) as Istio does, since the RBAC path
rules rely on it (Ferry always matches the normalized path).

`inbound_config(config, listener, cluster, policy)` returns a copy of a `bench.envoy.envoy_config`
bootstrap whose listener `listener` runs these filters.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any

from bench.envoy import tcp_proxy

_API = "type.googleapis.com/envoy.extensions.filters"
JWT_FILTER = "envoy.filters.http.jwt_authn"
RATELIMIT_FILTER = "envoy.filters.http.local_ratelimit"
JWT_PROVIDER = "bench"
PAYLOAD_KEY = "payload"
L4_RBAC_PREFIX = "in_rbac"
"""Network RBAC stats: ``<prefix>.rbac.allowed`` / ``.denied`` (one per connection)."""
HTTP_PREFIX = "in_http"
"""Connection manager stats: ``http.<prefix>.rbac.allowed``, ``http.<prefix>.jwt_authn.*``."""
RATELIMIT_PREFIX = "in_ratelimit"
"""Local rate limit stats: ``<prefix>.http_local_rate_limit.ok`` / ``.rate_limited``."""


@dataclass(frozen=True)
class L4Rule:
    """ALLOW connections from any of `ip_blocks` to any of `ports` (() = any port)."""

    ip_blocks: tuple[str, ...]
    ports: tuple[int, ...] = ()


@dataclass(frozen=True)
class HttpRule:
    """ALLOW requests with one of `methods` to one of `paths` (exact); with `issuer`, only
    requests that carry a valid token of that issuer (Istio ``requestPrincipals: [<issuer>/*]``)."""

    methods: tuple[str, ...]
    paths: tuple[str, ...]
    issuer: str | None = None


@dataclass(frozen=True)
class Jwt:
    """One JWT issuer: tokens in ``Authorization: Bearer`` (both proxies' default), verified
    against the inline `jwks` (a JSON string); each proxy caches up to `cache_size` verified
    tokens (Ferry's fixed cache, Envoy's ``jwt_cache_config``)."""

    issuer: str
    audiences: tuple[str, ...]
    jwks: str
    cache_size: int


@dataclass(frozen=True)
class Bucket:
    max_tokens: int
    tokens_per_fill: int
    fill_interval_s: int


@dataclass(frozen=True)
class RateLimit:
    """`bucket` for every request; `probe_bucket` (tiny) for requests to `probe_path` only, so a
    second request there is answered 429 and proves the limiter is on."""

    bucket: Bucket
    probe_path: str
    probe_bucket: Bucket


@dataclass(frozen=True)
class Policy:
    """What a row applies to the server's inbound side; None: that kind of policy is absent."""

    l4: tuple[L4Rule, ...] | None = None
    http: tuple[HttpRule, ...] | None = None
    jwt: Jwt | None = None
    rate_limit: RateLimit | None = None

    @property
    def needs_http(self) -> bool:
        return self.http is not None or self.jwt is not None or self.rate_limit is not None


# --- RBAC ----------------------------------------------------------------------------------------


def _cidr(block: str) -> dict[str, Any]:
    network = ipaddress.ip_network(block, strict=False)
    return {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}


def _or_permissions(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {"or_rules": {"rules": items}}


def rule_name(index: int) -> str:
    """RBAC policy names sort in rule order (Envoy tries its policies in name order)."""
    return f"rule-{index:04d}"


def l4_rbac(rules: tuple[L4Rule, ...]) -> dict[str, Any]:
    """The network RBAC filter: ALLOW, one policy per rule."""
    policies = {}
    for index, rule in enumerate(rules):
        permissions = [{"destination_port": port} for port in rule.ports] or [{"any": True}]
        principals = [{"direct_remote_ip": _cidr(block)} for block in rule.ip_blocks]
        policies[rule_name(index)] = {"permissions": permissions, "principals": principals}
    return {
        "name": "envoy.filters.network.rbac",
        "typed_config": {
            "@type": f"{_API}.network.rbac.v3.RBAC",
            "stat_prefix": L4_RBAC_PREFIX,
            "rules": {"action": "ALLOW", "policies": policies},
        },
    }


def _jwt_claim(claim: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "filter": JWT_FILTER,
            "path": [{"key": PAYLOAD_KEY}, {"key": claim}],
            "value": value,
        }
    }


def http_rbac(rules: tuple[HttpRule, ...]) -> dict[str, Any]:
    """The HTTP RBAC filter: ALLOW, one policy per rule."""
    policies = {}
    for index, rule in enumerate(rules):
        methods = [
            {"header": {"name": ":method", "string_match": {"exact": m}}} for m in rule.methods
        ]
        paths = [{"url_path": {"path": {"exact": p}}} for p in rule.paths]
        permission = {"and_rules": {"rules": [_or_permissions(methods), _or_permissions(paths)]}}
        principal: dict[str, Any] = {"any": True}
        if rule.issuer is not None:
            iss = _jwt_claim("iss", {"string_match": {"exact": rule.issuer}})
            sub = _jwt_claim("sub", {"present_match": True})
            principal = {"and_ids": {"ids": [iss, sub]}}
        policies[rule_name(index)] = {"permissions": [permission], "principals": [principal]}
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": f"{_API}.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": policies},
        },
    }


# --- JWT and rate limits -------------------------------------------------------------------------


def jwt_authn(jwt: Jwt) -> dict[str, Any]:
    """One provider; a token is optional but must be valid when present (Istio's way)."""
    provider = {
        "issuer": jwt.issuer,
        "audiences": list(jwt.audiences),
        "local_jwks": {"inline_string": jwt.jwks},
        "payload_in_metadata": PAYLOAD_KEY,
        "jwt_cache_config": {"jwt_cache_size": jwt.cache_size},
    }
    requires = {
        "requires_any": {"requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]}
    }
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": f"{_API}.http.jwt_authn.v3.JwtAuthentication",
            "providers": {JWT_PROVIDER: provider},
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        },
    }


def _percent_100(key: str) -> dict[str, Any]:
    return {"runtime_key": key, "default_value": {"numerator": 100, "denominator": "HUNDRED"}}


def local_ratelimit_config(bucket: Bucket) -> dict[str, Any]:
    """A LocalRateLimit with `bucket`, enabled and enforced for 100 % of requests."""
    return {
        "@type": f"{_API}.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": RATELIMIT_PREFIX,
        "token_bucket": {
            "max_tokens": bucket.max_tokens,
            "tokens_per_fill": bucket.tokens_per_fill,
            "fill_interval": f"{bucket.fill_interval_s}s",
        },
        "filter_enabled": _percent_100("local_rate_limit_enabled"),
        "filter_enforced": _percent_100("local_rate_limit_enforced"),
    }


ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": f"{_API}.http.router.v3.Router",
        "suppress_envoy_headers": True,
    },
}


def http_connection_manager(policy: Policy, cluster: str) -> dict[str, Any]:
    """The connection manager with the policy's HTTP filters, every route to `cluster`."""
    filters: list[dict[str, Any]] = []
    if policy.jwt is not None:
        filters.append(jwt_authn(policy.jwt))
    if policy.http is not None:
        filters.append(http_rbac(policy.http))
    routes: list[dict[str, Any]] = []
    if policy.rate_limit is not None:
        limit = policy.rate_limit
        filters.append(
            {"name": RATELIMIT_FILTER, "typed_config": local_ratelimit_config(limit.bucket)}
        )
        routes.append(
            {
                "match": {"path": limit.probe_path},
                "route": {"cluster": cluster, "timeout": "0s"},
                "typed_per_filter_config": {
                    RATELIMIT_FILTER: local_ratelimit_config(limit.probe_bucket)
                },
            }
        )
    filters.append(ROUTER)
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}})
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_API}.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": HTTP_PREFIX,
            "generate_request_id": False,
            "normalize_path": True,
            "merge_slashes": True,
            "route_config": {
                "name": "inbound",
                "virtual_hosts": [{"name": "inbound", "domains": ["*"], "routes": routes}],
            },
            "http_filters": filters,
        },
    }


def inbound_filters(policy: Policy, listener: str, cluster: str) -> list[dict[str, Any]]:
    """The network filters of the inbound listener for `policy`: network RBAC when there are L4
    rules, then the connection manager when anything needs HTTP, else ``tcp_proxy``."""
    filters: list[dict[str, Any]] = []
    if policy.l4 is not None:
        filters.append(l4_rbac(policy.l4))
    if policy.needs_http:
        filters.append(http_connection_manager(policy, cluster))
    else:
        filters.append(tcp_proxy(listener, cluster))
    return filters


def inbound_config(
    config: dict[str, Any], listener: str, cluster: str, policy: Policy
) -> dict[str, Any]:
    """A copy of the bootstrap `config` whose listener `listener` enforces `policy`."""
    out = copy.deepcopy(config)
    for entry in out["static_resources"]["listeners"]:
        if entry["name"] == listener:
            entry["filter_chains"] = [{"filters": inbound_filters(policy, listener, cluster)}]
            return out
    raise ValueError(f"no listener {listener!r} in the bootstrap")
