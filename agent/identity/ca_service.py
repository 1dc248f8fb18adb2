"""The CA service's decision: may this node agent have a certificate for this identity?

`agent ca serve` (`agent.identity.ca_server`) signs workload certificates from CSRs that node
agents send, so that nodes hold no signing key and a node can only obtain identities of pods
scheduled on it.  Everything it decides is here, as pure functions over plain data:

- `CsrFacts` is what a CSR asks for and whether it is sound (the server reads it with
  `ca_server.csr_facts`; this module imports no cryptography, no sockets).
- `caller_node(review, agent_pod)`: the node a token is bound to.  A projected service-account
  token names it in the TokenReview's `user.extra["authentication.kubernetes.io/node-name"]`
  (Kubernetes 1.30+); older servers name only the pod (`.../pod-name`), whose `spec.nodeName` is
  then the node (the server passes that pod, fetched, as `agent_pod`).
- `decide(...)` checks, in this order, and answers with the first failure (an HTTP status and a
  reason a user can act on) or an approval naming the SPIFFE ID to sign:
  the token is authenticated (401 otherwise: forged, expired, revoked), belongs to one of the
  node agent service accounts (403), is bound to a node (403); the CSR's signature verifies, its
  key is ECDSA P-256, and it asks for exactly one name, a URI SAN that is a SPIFFE ID of this
  trust domain (400); the named pod exists (403), is in the ID's namespace (403), is scheduled
  on the caller's node (403), runs as the ID's service account (403) and has not finished (403).

`parse_request` reads the request body (`RequestError`, a 400, names what is wrong).  The request
names the pod (`namespace`, `name`) because the CA may only `get` pods, not list them: any
running pod of that service account on the node proves the node may hold the identity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent import names
from agent.identity.spiffe import IdentityError, SpiffeId, parse_spiffe_id

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Review:
    """What the API server's TokenReview said about the caller's token."""

    authenticated: bool
    username: str = ""
    extra: Mapping[str, Sequence[str]] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class PodFacts:
    """The fields of a pod the decision reads."""

    namespace: str
    name: str
    node: str
    service_account: str
    phase: str = "Running"


@dataclass(frozen=True)
class CsrFacts:
    signature_valid: bool
    key_ok: bool  # ECDSA P-256
    uris: tuple[str, ...]
    other_names: tuple[str, ...]  # DNS, IP, e-mail and other SANs: never granted


@dataclass(frozen=True)
class Approved:
    identity: SpiffeId
    node: str


@dataclass(frozen=True)
class Refused:
    status: int  # 400 bad CSR, 401 unauthenticated, 403 not allowed
    reason: str


Verdict = Approved | Refused


class RequestError(ValueError):
    """The request body is not a certificate request; the message names the bad value."""


@dataclass(frozen=True)
class CertificateRequest:
    csr_pem: bytes
    pod_ref: tuple[str, str]  # (namespace, name) of a pod on the caller's node
    ttl: float  # seconds, within 60 .. max_ttl


def parse_request(body: bytes, max_ttl: float) -> CertificateRequest:
    """`{"csr": PEM, "pod": {"namespace", "name"}, "ttl_seconds": N}`; raise `RequestError`."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError("the body is not JSON") from None
    if not isinstance(request, dict):
        raise RequestError(f"the body must be a JSON object, got {type(request).__name__}")
    csr, pod = request.get("csr"), request.get("pod")
    if not isinstance(csr, str) or not csr:
        raise RequestError("csr must be a PEM certificate signing request (a string)")
    if not isinstance(pod, dict):
        raise RequestError(f"pod must be an object {{namespace, name}}, got {pod!r:.80}")
    try:
        pod_ref = (
            names.dns_label("pod namespace", pod.get("namespace")),
            names.dns_subdomain("pod name", pod.get("name")),
        )
    except names.InvalidName as exc:
        raise RequestError(str(exc)) from None
    ttl = request.get("ttl_seconds", max_ttl)
    number = isinstance(ttl, int | float) and not isinstance(ttl, bool)
    if not number or not math.isfinite(ttl) or ttl <= 0:
        raise RequestError(f"ttl_seconds {ttl!r:.40} must be a positive number of seconds")
    return CertificateRequest(csr.encode(), pod_ref, min(max(float(ttl), 60.0), max_ttl))


def caller_node(review: Review, agent_pod: PodFacts | None) -> str | None:
    """The node the caller's token is bound to, or None when it is bound to none."""
    named = list(review.extra.get(NODE_NAME_EXTRA, ()))
    if len(named) == 1 and named[0]:
        return named[0]
    if agent_pod is not None and agent_pod.node:
        return agent_pod.node
    return None


def agent_pod_name(review: Review) -> str | None:
    """The pod a token is bound to (`.../pod-name`), when the server must look its node up."""
    named = list(review.extra.get(POD_NAME_EXTRA, ()))
    return named[0] if len(named) == 1 and named[0] else None


def decide(
    trust_domain: str,
    agent_accounts: frozenset[str],
    review: Review,
    node: str | None,
    csr: CsrFacts,
    pod_ref: tuple[str, str],
    pod: PodFacts | None,
) -> Verdict:
    """May the caller (`review`, bound to `node`) have `csr` signed for the pod `pod_ref`?"""
    if not review.authenticated:
        return Refused(401, f"the token is not authenticated: {review.error or 'no reason'}")
    if review.username not in agent_accounts:
        return Refused(
            403,
            f"{review.username!r} is not a Ferry node agent "
            f"(allowed: {', '.join(sorted(agent_accounts))})",
        )
    if node is None:
        return Refused(
            403,
            f"the token of {review.username!r} is bound to no node: use a projected "
            "service-account token of the agent's pod",
        )
    if not csr.signature_valid:
        return Refused(400, "the CSR's signature does not verify")
    if not csr.key_ok:
        return Refused(400, "the CSR's key is not ECDSA P-256")
    if csr.other_names or len(csr.uris) != 1:
        names = [*csr.uris, *csr.other_names]
        return Refused(
            400, f"the CSR must ask for exactly one URI SAN, a SPIFFE ID, and nothing else: {names}"
        )
    try:
        identity = parse_spiffe_id(csr.uris[0])
    except IdentityError as exc:
        return Refused(400, str(exc))
    if identity.trust_domain != trust_domain:
        return Refused(400, f"{identity.uri!r} is not in this CA's trust domain {trust_domain!r}")
    namespace, name = pod_ref
    if pod is None:
        return Refused(403, f"pod {namespace}/{name} not found")
    if pod.namespace != identity.namespace:
        return Refused(
            403, f"pod {namespace}/{name} is not in namespace {identity.namespace!r} of {identity}"
        )
    if pod.node != node:
        return Refused(
            403,
            f"pod {namespace}/{name} is scheduled on node {pod.node or '(none)'!r}, not on the "
            f"requesting node {node!r}",
        )
    if pod.service_account != identity.service_account:
        return Refused(
            403,
            f"pod {namespace}/{name} runs as service account {pod.service_account!r}, "
            f"not {identity.service_account!r} of {identity}",
        )
    if pod.phase in FINISHED:
        return Refused(403, f"pod {namespace}/{name} has finished ({pod.phase})")
    return Approved(identity, node)


def pod_facts(obj: Mapping[str, object]) -> PodFacts:
    """A pod object's (a JSON dict from the API server) facts; missing fields are empty."""
    meta, spec, status = (obj.get(part) for part in ("metadata", "spec", "status"))
    meta = meta if isinstance(meta, Mapping) else {}
    spec = spec if isinstance(spec, Mapping) else {}
    status = status if isinstance(status, Mapping) else {}
    return PodFacts(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        node=str(spec.get("nodeName") or ""),
        service_account=str(spec.get("serviceAccountName") or "default"),
        phase=str(status.get("phase") or "Pending"),
    )
