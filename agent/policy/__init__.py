"""API security policy: Istio's AuthorizationPolicy and RequestAuthentication, Ferry's
RateLimitPolicy, decided on the node proxy.

Every module here is a pure core (no sockets, TLS, event loops or kernel libraries; the
import-linter contract in pyproject.toml holds them to it):

- `documents`: YAML files -> validated, typed documents, or errors naming file, field and reason;
  the JSON Schemas of the three kinds are in `schema/`;
- `facts`: what the proxy knows about a connection or request (the engines' input), and the
  request path normalization;
- `authz`: AuthorizationPolicy, its model and semantics; `authz_engine` compiles it per workload
  (`decide(facts) -> Verdict`) with `authz_match`, `authz_rules` and `authz_index`;
- `jwt`, `jwks`: RequestAuthentication (token location, verification, claims) and key sets;
- `ratelimit`: RateLimitPolicy rules and token-bucket arithmetic;
- `compile`: the policy set in force (one wire encoding) and what of it selects one workload;
- `cli`: `agent policy validate` (imports only click until it runs).
"""
