"""`agent policy check`: one hypothetical connection or request, decided by the policy in force
(pure).

The CLI sends the request to the running agent (admin op `policy_check`); the agent compiles the
policy in force for the workload named (`agent.policy.compile.compile_for`, with the workload's
namespace and labels) and calls `evaluate`, the same engine the proxy runs:

1. facts: the source principal (`--from-principal`, a SPIFFE ID or Istio's `<td>/ns/<ns>/sa/<sa>`
   form, which gets "spiffe://" in front; none means plaintext), the source IP (`--from-ip`, none
   means unknown: IP blocks do not match it), the workload's first address and `--port`.  With
   any of `--method`, `--path`, `--host`, `--header`, `--jwt` it is an HTTP request (method GET
   and path "/" unless given; the path normalized as the proxy does, the query split off);
   without, an L4 decision (a connection).
2. authentication: when a RequestAuthentication selects the workload, its `JwtAuthenticator`
   reads the request (`--jwt TOKEN` is sent as `Authorization: Bearer TOKEN`; give
   `--header NAME=VALUE` for other locations).  An invalid token is a denial (401, or 403 for an
   audience mismatch) before authorization runs, as in the proxy; a valid one gives the JWT facts.
   Without a RequestAuthentication a token is not looked at (Istio's behaviour too).
3. authorization: `WorkloadAuthz.decide` names the policy and rule that decided.

`CheckRequest.from_json` validates the admin request, naming the bad field.  The token never
appears in a result, a log or a `repr`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.policy.compile import WorkloadPolicy
from agent.policy.facts import Facts, HttpFacts, fold_headers, normalize_path

SPIFFE = "spiffe://"
UNREAD_TOKEN = "no RequestAuthentication selects this workload: the token is not looked at"


class CheckError(ValueError):
    """A malformed check request; the message names the field and the value."""


@dataclass(frozen=True)
class CheckRequest:
    port: int
    principal: str = ""  # SPIFFE ID; "" plaintext
    source_ip: str = ""  # "" unknown
    method: str | None = None
    path: str | None = None
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    jwt: str | None = field(default=None, repr=False)

    @property
    def is_http(self) -> bool:
        return any(
            value is not None for value in (self.method, self.path, self.host, self.jwt)
        ) or bool(self.headers)

    @staticmethod
    def from_json(body: Mapping[str, Any]) -> CheckRequest:
        port = body.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise CheckError(f"port: {port!r} is not a TCP port (1-65535)")
        principal = _optional(body, "from_principal") or ""
        if principal and not principal.startswith(SPIFFE):
            principal = SPIFFE + principal
        source_ip = _optional(body, "from_ip") or ""
        if source_ip:
            try:
                ipaddress.ip_address(source_ip)
            except ValueError:
                raise CheckError(f"from_ip: {source_ip!r} is not an IP address") from None
        if not principal and not source_ip:
            raise CheckError("give the source: from_principal, from_ip or both")
        raw_headers = body.get("headers") or {}
        if not isinstance(raw_headers, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in raw_headers.items()
        ):
            raise CheckError(f"headers: {raw_headers!r:.80} is not an object of name: value")
        return CheckRequest(
            port=port,
            principal=principal,
            source_ip=source_ip,
            method=_optional(body, "method"),
            path=_optional(body, "path"),
            host=_optional(body, "host"),
            headers=tuple(raw_headers.items()),
            jwt=_optional(body, "jwt"),
        )


def _optional(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise CheckError(f"{key}: {value!r:.80} is not a string")
    return value


def evaluate(
    policy: WorkloadPolicy, destination_ip: str, request: CheckRequest, now: float
) -> dict[str, Any]:
    """The decision for `request` to a workload whose compiled policy is `policy`."""
    result: dict[str, Any] = {
        "policies": list(policy.policies),
        "http": request.is_http,
        "http_inspected_port": policy.needs_http(request.port),
        "jwt": None,
    }
    http: HttpFacts | None = None
    if request.is_http:
        target = request.path or "/"
        path = normalize_path(target)
        if path is None:
            raise CheckError(f"path: {target!r} is not an absolute path (the proxy answers 400)")
        query = target.partition("?")[2]
        headers = fold_headers(request.headers)
        if request.jwt is not None:
            headers.setdefault("authorization", f"Bearer {request.jwt}")
        jwt_facts = None
        if policy.jwt is None:
            if request.jwt is not None:
                result["jwt"] = {"status": 0, "reason": UNREAD_TOKEN, "principal": ""}
        else:
            outcome = policy.jwt.authenticate(headers, query, now)
            result["jwt"] = {
                "status": outcome.status,
                "reason": str(outcome.reason),
                "principal": outcome.facts.principal if outcome.facts else "",
            }
            if outcome.status:
                return {
                    **result,
                    "allowed": False,
                    "decided_by": "authentication",
                    "status": outcome.status,
                    "policy": "",
                    "rule": None,
                    "action": "",
                    "reason": str(outcome.reason),
                    "audit": [],
                }
            jwt_facts = outcome.facts
        http = HttpFacts(
            method=request.method or "GET",
            path=path,
            host=request.host or headers.get("host", ""),
            headers=headers,
            jwt=jwt_facts,
        )
    facts = Facts(request.principal, request.source_ip, destination_ip, request.port, http)
    verdict = policy.authz.decide(facts)
    return {
        **result,
        "allowed": verdict.allowed,
        "decided_by": "authorization",
        "status": 0 if verdict.allowed else 403,
        "policy": verdict.policy,
        "rule": verdict.rule,
        "action": verdict.action,
        "reason": verdict.reason,
        "audit": list(verdict.audit),
    }
