"""Names: the one set of rules for DNS labels, DNS subdomains and trust domains (pure).

Kubernetes namespaces and service accounts are DNS labels (RFC 1123: lower-case letters, digits
and '-', 1 to 63 characters, starting and ending with a letter or digit).  Node names and trust
domains are DNS subdomains: labels joined by '.', at most 253 characters in all.  The config, the
enrollment requests and the SPIFFE IDs (`agent.identity.spiffe`) all validate through here, so a
name one part accepts is never refused by another.

Every check returns the value unchanged or raises `InvalidName` (a `ValueError`) whose message
names the kind and the bad value; callers that own a key (the config) or an error type (identity)
prefix or convert it.  This module imports only `re`, so the proxy workers and the CLI may use it.
"""

from __future__ import annotations

import re

LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_LABEL = re.compile(LABEL)
DNS_SUBDOMAIN = re.compile(rf"{LABEL}(\.{LABEL})*")
MAX_SUBDOMAIN = 253

LABEL_RULE = (
    "must be a DNS label (lower-case letters, digits and '-', at most 63 characters, starting "
    "and ending with a letter or digit)"
)
SUBDOMAIN_RULE = (
    "must be a lower-case DNS name (labels of letters, digits and '-' separated by '.', at most "
    "253 characters)"
)


class InvalidName(ValueError):
    """A name breaks its rule; the message names the kind of name and the value."""


def dns_label(kind: str, value: object) -> str:
    """`value` if it is a DNS label (a namespace, a service account), else `InvalidName`."""
    if not isinstance(value, str) or not DNS_LABEL.fullmatch(value):
        raise InvalidName(f"invalid {kind} {value!r}: {LABEL_RULE}")
    return value


def dns_subdomain(kind: str, value: object) -> str:
    """`value` if it is a DNS subdomain (a node name, a trust domain), else `InvalidName`."""
    if (
        not isinstance(value, str)
        or len(value) > MAX_SUBDOMAIN
        or not DNS_SUBDOMAIN.fullmatch(value)
    ):
        raise InvalidName(f"invalid {kind} {value!r}: {SUBDOMAIN_RULE}")
    return value


def trust_domain(value: object) -> str:
    """`value` if it is a trust domain (a lower-case DNS name: no port, no user info)."""
    return dns_subdomain("trust domain", value)


def node_name(value: object) -> str:
    """`value` if it is a node name (a DNS subdomain, as Kubernetes node names are)."""
    return dns_subdomain("node name", value)
