"""SPIFFE IDs of workloads: formatting and strict parsing (pure, no I/O).

A Ferry workload identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
Only that exact shape is accepted: a lower-case DNS-name trust domain (no port, no user info) and
exactly the four path segments `ns`, namespace, `sa`, service account, where namespace and service
account are DNS labels, as in Kubernetes (the rules for both are `agent.names`, shared with the
config and enrollment).  No query, no fragment, no percent-encoding, no empty or
extra segments, no upper case anywhere.  Anything else raises `IdentityError` (a `ValueError`)
naming the offending value, so a peer certificate with a surprising URI is refused rather than
half-understood.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import names

SCHEME = "spiffe://"
DNS_LABEL = names.DNS_LABEL  # the rules live in `agent.names`; these are their patterns
DNS_NAME = names.DNS_SUBDOMAIN


class IdentityError(ValueError):
    """An identity, certificate or CA operation was refused; the message names the bad value."""


@dataclass(frozen=True)
class SpiffeId:
    """A parsed workload identity; `str()` gives the URI."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a lower-case DNS name, else raise `IdentityError`."""
    try:
        return names.trust_domain(trust_domain)
    except names.InvalidName as exc:
        raise IdentityError(str(exc)) from None


def validate_label(kind: str, value: str) -> str:
    """Return `value` if it is a DNS label (namespace, service account), else raise."""
    try:
        return names.dns_label(kind, value)
    except names.InvalidName as exc:
        raise IdentityError(str(exc)) from None


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID URI of a workload; every part is validated."""
    return SpiffeId(
        validate_trust_domain(trust_domain),
        validate_label("namespace", namespace),
        validate_label("service account", service_account),
    ).uri


# The whole valid shape in one pattern: the fast path for the common case (a directory of 100,000
# entries checks as many IDs); anything it does not match goes through the checks below, which
# say what is wrong.
_VALID = re.compile(
    rf"spiffe://(?P<td>{names.DNS_SUBDOMAIN.pattern})/ns/(?P<ns>{names.LABEL})"
    rf"/sa/(?P<sa>{names.LABEL})"
)


def is_spiffe_id(uri: object) -> bool:
    """Whether `uri` is a valid Ferry SPIFFE ID (what `parse_spiffe_id` accepts), quickly."""
    match = _VALID.fullmatch(uri) if isinstance(uri, str) else None
    return match is not None and len(match["td"]) <= names.MAX_SUBDOMAIN


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; anything else raises `IdentityError`."""
    match = _VALID.fullmatch(uri) if isinstance(uri, str) else None
    if match is not None and len(match["td"]) <= names.MAX_SUBDOMAIN:
        return SpiffeId(match["td"], match["ns"], match["sa"])

    def bad(reason: str) -> IdentityError:
        return IdentityError(f"invalid SPIFFE ID {uri!r}: {reason}")

    if not isinstance(uri, str):
        raise bad("not a string")
    if "?" in uri or "#" in uri:
        raise bad("a query or fragment is not allowed")
    if "%" in uri:
        raise bad("percent-encoding is not allowed")
    if not uri.startswith(SCHEME):
        if uri.lower().startswith(SCHEME):
            raise bad("the scheme must be lower-case 'spiffe://'")
        raise bad("the scheme must be 'spiffe://'")
    authority, slash, path = uri[len(SCHEME) :].partition("/")
    if not authority:
        raise bad("the trust domain is empty")
    if "@" in authority or ":" in authority:
        raise bad(f"the trust domain {authority!r} must not carry user info or a port")
    if authority != authority.lower():
        raise bad(f"the trust domain {authority!r} must be lower-case")
    try:
        validate_trust_domain(authority)
    except IdentityError as exc:
        raise bad(str(exc)) from exc
    segments = path.split("/") if slash else []
    if any(segment == "" for segment in segments):
        raise bad("empty path segment")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise bad("the path must be exactly /ns/<namespace>/sa/<service account>")
    namespace, service_account = segments[1], segments[3]
    for kind, value in (("namespace", namespace), ("service account", service_account)):
        if value != value.lower():
            raise bad(f"the {kind} {value!r} must be lower-case")
        try:
            validate_label(kind, value)
        except IdentityError as exc:
            raise bad(str(exc)) from exc
    return SpiffeId(authority, namespace, service_account)


def identity_from_uris(uris: Sequence[str], trust_domain: str, what: str = "peer") -> SpiffeId:
    """The SPIFFE ID among a certificate's URI SANs: exactly one, in `trust_domain`."""
    if len(uris) != 1:
        raise IdentityError(
            f"{what} certificate has {len(uris)} URI SANs {list(uris)!r}; a SPIFFE certificate "
            "has exactly one"
        )
    identity = parse_spiffe_id(uris[0])
    if identity.trust_domain != trust_domain:
        raise IdentityError(
            f"peer identity {identity.uri!r} is not in trust domain {trust_domain!r}"
        )
    return identity


def peer_identity(peercert: Mapping[str, Any], trust_domain: str) -> SpiffeId:
    """The SPIFFE ID of a verified TLS peer, from `SSLSocket.getpeercert()`'s dictionary.

    The proxy's workers use this instead of parsing DER with `cryptography` (about 9 MB per
    process): OpenSSL has already verified the chain, and the dictionary lists its SANs.
    """
    uris = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]
    return identity_from_uris(uris, trust_domain)
