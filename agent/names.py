"""Names: the one set of rules for DNS labels, DNS subdomains, trust domains and workload labels
(pure).

Kubernetes namespaces and service accounts are DNS labels (RFC 1123: lower-case letters, digits
and '-', 1 to 63 characters, starting and ending with a letter or digit).  Node names and trust
domains are DNS subdomains: labels joined by '.', at most 253 characters in all.  The config, the
enrollment requests and the SPIFFE IDs (`agent.identity.spiffe`) all validate through here, so a
name one part accepts is never refused by another.

Workload labels (what policy selectors match) follow Kubernetes' rules for object labels
(`k8s.io/apimachinery/pkg/util/validation`): a key is an optional prefix, a DNS subdomain, and
'/', then a name of 1 to 63 characters of letters (either case), digits, '-', '_' and '.',
starting and ending with a letter or digit (`app`, `app.kubernetes.io/name`); a value is empty
or a name by the same rule.  `labels` checks a whole mapping and returns it in the one form the
agent stores and sends: a tuple of (key, value) pairs sorted by key; `label_assignment` reads the
`KEY=VALUE` form of the command line.

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
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")

LABEL_RULE = (
    "must be a DNS label (lower-case letters, digits and '-', at most 63 characters, starting "
    "and ending with a letter or digit)"
)
SUBDOMAIN_RULE = (
    "must be a lower-case DNS name (labels of letters, digits and '-' separated by '.', at most "
    "253 characters)"
)
LABEL_NAME_RULE = (
    "at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a "
    "letter or digit"
)
LABEL_KEY_RULE = (
    f"a label key is an optional DNS-subdomain prefix and '/', then a name: {LABEL_NAME_RULE}"
)
LABEL_VALUE_RULE = f"a label value is empty or {LABEL_NAME_RULE}"


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


def label_key(value: object) -> str:
    """`value` if it is a label key (`[prefix/]name`, Kubernetes' rule), else `InvalidName`."""
    if isinstance(value, str):
        prefix, slash, name = value.rpartition("/")
        if LABEL_NAME.fullmatch(name) and (
            not slash
            or (len(prefix) <= MAX_SUBDOMAIN and DNS_SUBDOMAIN.fullmatch(prefix) is not None)
        ):
            return value
    raise InvalidName(f"invalid label key {value!r}: {LABEL_KEY_RULE}")


def label_value(key: str, value: object) -> str:
    """`value` if it is a label value (empty, or a name), else `InvalidName` naming the label."""
    if not isinstance(value, str) or (value and not LABEL_NAME.fullmatch(value)):
        raise InvalidName(f"invalid value {value!r} of label {key!r}: {LABEL_VALUE_RULE}")
    return value


def labels(mapping: object) -> tuple[tuple[str, str], ...]:
    """A mapping of labels, checked, as (key, value) pairs sorted by key."""
    if not isinstance(mapping, dict):
        raise InvalidName(f"labels must be a mapping of key to value, got {mapping!r:.80}")
    return tuple(sorted((label_key(k), label_value(k, v)) for k, v in mapping.items()))


def label_assignment(text: str) -> tuple[str, str]:
    """`KEY=VALUE` (the value may be empty) as a checked (key, value) pair."""
    key, equals, value = text.partition("=")
    if not equals:
        raise InvalidName(f"invalid label {text!r}: expected KEY=VALUE (e.g. app=web)")
    return label_key(key), label_value(key, value)
