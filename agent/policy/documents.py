"""Policy documents: YAML files -> validated, typed documents, or errors naming file, field, reason.

Ferry reads three kinds, shaped as Kubernetes objects (`apiVersion`, `kind`, `metadata.name`,
`metadata.namespace`, `spec`) so the same YAML is a file on a standalone node and an object in a
cluster:

- `AuthorizationPolicy` and `RequestAuthentication` of `security.istio.io/v1` (or `v1beta1`,
  which Istio serves with the same schema), read verbatim with Istio's meaning;
- `RateLimitPolicy` of `ferry.dev/v1alpha1`, Ferry's own.

How a document is checked, in order (every problem becomes one `PolicyError`):

1. YAML: a file holds one or more documents separated by `---`; empty documents are skipped (as
   kubectl does).  Keys whose value is null are dropped first, as the Kubernetes API server prunes
   nulls of non-nullable fields (`rules:` with nothing after it is "no rules").
2. Kind: `kind` must be one of the three above.
3. JSON Schema (draft 2020-12): `agent/policy/schema/<kind>.json`, the published schema, also meant
   to become the CRD's OpenAPI schema.  The schemas reject unknown fields (`additionalProperties:
   false`), so a typo such as `notPrinciple` is an error instead of a silently wider policy; a
   CRD built from them keeps Kubernetes' pruning plus kubectl's strict field validation instead.
4. Semantics, as Istio's admission webhook checks them.  AuthorizationPolicy
   (`ValidateAuthorizationPolicy`) here: action CUSTOM refused (Ferry has no external
   authorizers); DENY without `rules` refused (it could never match); `from: []` / `to: []`, an
   empty `source` / `operation`, a `when` without values, `serviceAccounts` mixed with
   `principals`/`namespaces`, unknown `when` keys, bad IPs/CIDRs, ports that are not decimal
   0-65535, unsupported path templates, all refused.  Where Istio's webhook accepts what its
   translator later drops silently, Ferry refuses it up front instead: malformed
   `request.auth.claims[...]` keys, and `when` keys that only mean something in Envoy
   (`connection.sni`, `experimental.envoy.filters.*`, `source.serviceAccount`,
   `source.trustDomain`).  The `istio.io/dry-run: "true"` annotation is refused too: Ferry has
   no shadow mode, and silently enforcing a dry-run policy would deny real traffic.
   A RequestAuthentication's `jwtRules` are checked by `agent.policy.jwt_rules.JwtRule.from_spec`
   (which also parses inline key sets) and a RateLimitPolicy's spec by
   `agent.policy.ratelimit.parse_rules` (durations, bucket bounds, patterns): what validates is
   exactly what the proxy can enforce.

`metadata.namespace` defaults to "default" when absent, as kubectl does.  A (kind, namespace,
name) seen twice across the files loaded together is an error on the second one.

What the agent must do with a `Loaded`: if `errors` is not empty, reject the whole change and
keep the previous policy set in force (log every error); a partial set could allow what a
rejected DENY was meant to stop.  `warnings` never block (a DENY rule made only of HTTP
attributes, which denies all non-HTTP traffic on every port of its workloads).

The typed documents are frozen dataclasses with Python names (`not_principals`).  Each engine
owns the model of its kind: `agent.policy.authz` the AuthorizationPolicy (import it from there),
`agent.policy.jwt_rules.JwtRule` the jwtRules, `agent.policy.ratelimit` the rate-limit rules (a
RateLimitPolicy keeps its checked spec).  `encode` turns a document back into its canonical
Kubernetes-shaped dict, which `parse_document` reads again to an equal document (the wire format
of `agent.policy.compile.PolicySet`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

import jsonschema
import yaml

from agent.policy.authz import (
    CLAIMS_KEY,
    HEADER_KEY,
    TEMPLATE_ANY,
    TEMPLATE_ONE,
    AuthorizationPolicy,
    Condition,
    Labels,
    Operation,
    Rule,
    Source,
    claim_path_of,
    header_of,
    is_path_template,
    rule_uses_http,
)
from agent.policy.jwt_rules import JwtRule
from agent.policy.ratelimit import RateLimitError, parse_rules

SCHEMA_DIR = Path(__file__).with_name("schema")
ISTIO_API_VERSION = "security.istio.io/v1"
FERRY_API_VERSION = "ferry.dev/v1alpha1"
DEFAULT_NAMESPACE = "default"
POLICY_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class PolicyError:
    """One problem in one document: where (file, document, field path) and why."""

    file: str
    document: str  # "AuthorizationPolicy ns/name", or "document #3" when it has no usable name
    field: str  # e.g. "spec.rules[0].to[1].operation.ports[2]"; "" for the whole document
    reason: str

    def __str__(self) -> str:
        """`file: kind ns/name: field: reason`, leaving out what is unknown (a whole file)."""
        return ": ".join(
            [part for part in (self.file, self.document, self.field) if part] + [self.reason]
        )


class InvalidPolicy(ValueError):
    """Raised where a whole set must be valid (`PolicySet.from_json`); carries every error."""

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(str(error) for error in self.errors))


# --- typed documents -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    kind: ClassVar[str] = "RequestAuthentication"
    name: str
    namespace: str
    selector: Labels = ()
    jwt_rules: tuple[JwtRule, ...] = ()  # `agent.policy.jwt_rules.JwtRule`, validated by it

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Its `spec` stays plain data, checked by `agent.policy.ratelimit.parse_rules`, which
    compiles it per workload (its principals depend on the trust domain)."""

    kind: ClassVar[str] = "RateLimitPolicy"
    name: str
    namespace: str
    selector: Labels = ()
    spec: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


Document: TypeAlias = AuthorizationPolicy | RequestAuthentication | RateLimitPolicy
KINDS: dict[str, tuple[str, str]] = {  # kind -> (schema file, apiVersion written by `encode`)
    "AuthorizationPolicy": ("authorizationpolicy.json", ISTIO_API_VERSION),
    "RequestAuthentication": ("requestauthentication.json", ISTIO_API_VERSION),
    "RateLimitPolicy": ("ratelimitpolicy.json", FERRY_API_VERSION),
}

# camelCase YAML name <-> Python field name, for the structures read field by field.
SOURCE_FIELDS = (
    ("principals", "principals"),
    ("notPrincipals", "not_principals"),
    ("requestPrincipals", "request_principals"),
    ("notRequestPrincipals", "not_request_principals"),
    ("namespaces", "namespaces"),
    ("notNamespaces", "not_namespaces"),
    ("ipBlocks", "ip_blocks"),
    ("notIpBlocks", "not_ip_blocks"),
    ("remoteIpBlocks", "remote_ip_blocks"),
    ("notRemoteIpBlocks", "not_remote_ip_blocks"),
    ("serviceAccounts", "service_accounts"),
    ("notServiceAccounts", "not_service_accounts"),
)
OPERATION_FIELDS = (
    ("hosts", "hosts"),
    ("notHosts", "not_hosts"),
    ("ports", "ports"),
    ("notPorts", "not_ports"),
    ("methods", "methods"),
    ("notMethods", "not_methods"),
    ("paths", "paths"),
    ("notPaths", "not_paths"),
)

# --- `when` keys (semantics 1.12) --------------------------------------------------------------

IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
STRING_KEYS = frozenset(
    {
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
    }
)
UNSUPPORTED_KEYS = {
    "connection.sni": "Ferry terminates no TLS of the application's own",
    "source.serviceAccount": "use source.principal",
    "source.trustDomain": "use source.principal",
}


# --- value checks shared by the kinds ---------------------------------------------------------


def check_ip(value: str) -> str | None:
    """None if `value` is an IP address or CIDR block (v4 or v6, host bits allowed, as Go's
    netip.ParsePrefix); else the reason."""
    address, slash, bits = value.partition("/")
    try:
        if slash:
            if not bits.isdigit():
                raise ValueError(bits)
            ipaddress.ip_network(f"{address}/{int(bits)}", strict=False)
        else:
            ipaddress.ip_address(address)
    except ValueError:
        kind = "CIDR block" if slash else "IP address"
        return f"{value!r} is not an {kind}"
    return None


def check_port(value: str) -> str | None:
    """None if `value` is a decimal port 0-65535 written as a string (Istio's rule)."""
    if value.isdigit() and value.isascii() and int(value) <= 65535:
        return None
    return f"{value!r} is not a port (a decimal number 0-65535, as a string)"


UNSUPPORTED_TEMPLATE = re.compile(r"/\{\w+=\*[*]?\}|\{\w*\}|/\*[*]?|\*[*]?/")  # Istio's check


def check_path(value: str) -> str | None:
    """None if `value` is a usable path pattern: exact, `prefix*`, `*suffix`, `*`, or a template
    where `{*}` is one segment and `{**}` any rest (only once, at the end), nothing else."""
    if not is_path_template(value):
        return None
    rest = value.replace(TEMPLATE_ANY, "").replace(TEMPLATE_ONE, "")
    bad = (
        UNSUPPORTED_TEMPLATE.search(value)
        or any(c in rest for c in "*{}")
        or not value.startswith("/")
        or value.count(TEMPLATE_ANY) > 1
        or (TEMPLATE_ANY in value and "/" in value.split(TEMPLATE_ANY, 1)[1])
    )
    if bad:
        return (
            f"{value!r} is not a supported path template: use {{*}} for one segment and "
            "{**} for the rest (once, last), no other '*', '{' or '}'"
        )
    return None


def check_service_account(value: str) -> str | None:
    """`<namespace>/<service-account>` or `<service-account>`, no wildcards (Istio's rule)."""
    parts = value.split("/")
    if "*" in value:
        return f"{value!r}: wildcards are not supported in serviceAccounts"
    if len(parts) > 2 or not all(parts):
        return f"{value!r} is not <namespace>/<service-account> or <service-account>"
    return None


# --- validation --------------------------------------------------------------------------------


@cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    """The JSON Schema validator of a kind (schemas read once per process)."""
    schema = json.loads((SCHEMA_DIR / KINDS[kind][0]).read_text())
    return jsonschema.Draft202012Validator(schema)


def _path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _schema_reason(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, with the schema's description instead of a bare regex."""
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "pattern" and description:
        return f"{error.instance!r} is invalid: {description}"
    return error.message


MAX_DEPTH = 64  # collections in collections; Istio's deepest path is a dozen
MAX_NODES = 100_000  # values in one document, YAML aliases expanded


class _Unusable(ValueError):
    """A decoded document no policy can be made of, whatever its fields: the reason."""


def _prune_nulls(
    value: Any, enclosing: frozenset[int] = frozenset(), budget: list[int] | None = None
) -> Any:
    """`value` without null members (Kubernetes drops them), as a tree of fresh collections;
    `_Unusable` for a collection that holds itself (a YAML alias of a node around it), nesting
    past MAX_DEPTH or more than MAX_NODES values (an alias bomb)."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _Unusable(f"more than {MAX_NODES} values (YAML aliases expanded)")
    if not isinstance(value, dict | list):
        return value
    if id(value) in enclosing:
        raise _Unusable("a collection holds itself (a YAML alias of a node around it)")
    if len(enclosing) >= MAX_DEPTH:
        raise _Unusable(f"collections nested deeper than {MAX_DEPTH}")
    inner = enclosing | {id(value)}
    if isinstance(value, dict):
        return {k: _prune_nulls(v, inner, budget) for k, v in value.items() if v is not None}
    return [_prune_nulls(v, inner, budget) for v in value]


@dataclass
class _Report:
    """Collects the problems of one document."""

    file: str
    document: str
    errors: list[PolicyError] = field(default_factory=list)
    warnings: list[PolicyError] = field(default_factory=list)

    def error(self, path: str, reason: str | None) -> None:
        if reason is not None:
            self.errors.append(PolicyError(self.file, self.document, path, reason))

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(PolicyError(self.file, self.document, path, reason))


def _strings(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(raw.get(key, ()))


def _selector(spec: Mapping[str, Any], report: _Report) -> Labels:
    labels: Mapping[str, str] = spec.get("selector", {}).get("matchLabels", {})
    for key, value in labels.items():
        path = f"spec.selector.matchLabels[{key}]"
        if not key:
            report.error(path, "empty label key is not supported in a selector")
        if "*" in key or "*" in value:
            report.error(path, f"wildcard is not supported in selector: {key}={value}")
    return tuple(sorted(labels.items()))


def _values(report: _Report, path: str, values: tuple[str, ...], check: Any) -> None:
    for index, value in enumerate(values):
        report.error(f"{path}[{index}]", check(value))


def _source(raw: Mapping[str, Any], path: str, report: _Report) -> Source:
    source = Source(**{name: _strings(raw, key) for key, name in SOURCE_FIELDS})
    if source == Source():
        report.error(path, "`source` must not be empty: set at least one field, or omit `from`")
    identity = source.principals or source.not_principals
    if (identity or source.namespaces or source.not_namespaces) and (
        source.service_accounts or source.not_service_accounts
    ):
        report.error(path, "cannot set serviceAccounts with namespaces or principals")
    for key, name in SOURCE_FIELDS:
        if "ip_blocks" in name:
            _values(report, f"{path}.{key}", getattr(source, name), check_ip)
        elif "service_accounts" in name:
            _values(report, f"{path}.{key}", getattr(source, name), check_service_account)
    return source


def _operation(raw: Mapping[str, Any], path: str, report: _Report) -> Operation:
    operation = Operation(**{name: _strings(raw, key) for key, name in OPERATION_FIELDS})
    if operation == Operation():
        report.error(path, "`operation` must not be empty: set at least one field, or omit `to`")
    for key in ("ports", "notPorts"):
        _values(report, f"{path}.{key}", _strings(raw, key), check_port)
    for key in ("paths", "notPaths"):
        _values(report, f"{path}.{key}", _strings(raw, key), check_path)
    return operation


def check_condition_value(key: str, value: str) -> str | None:
    """None if `value` suits the `when` key (IPs for addresses, ports for destination.port)."""
    if key in IP_KEYS:
        return check_ip(value)
    if key == "destination.port":
        return check_port(value)
    return None


def check_condition_key(key: str) -> str | None:
    """None if Ferry evaluates the `when` key; else the reason, in Istio's words where it has
    some."""
    if key in IP_KEYS or key in STRING_KEYS or key == "destination.port":
        return None
    if key.startswith(HEADER_KEY):
        return None if header_of(key) else f"bad key ({key}): should be request.headers[<name>]"
    if key.startswith(CLAIMS_KEY):
        if claim_path_of(key):
            return None
        return f"bad key ({key}): should be request.auth.claims[<name>] or [<name>][<nested>]"
    if key == "destination.namespace":
        return f"attribute {key} is replaced by the metadata.namespace"
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    if key in ("destination.name", "destination.user"):
        return f"deprecated attribute {key}: only supported in v1alpha1"
    if key in UNSUPPORTED_KEYS or key.startswith("experimental.envoy.filters."):
        hint = UNSUPPORTED_KEYS.get(key, "it matches Envoy's dynamic metadata")
        return f"attribute {key} is not supported by Ferry ({hint})"
    return f"unknown attribute: {key}"


def _condition(raw: Mapping[str, Any], path: str, report: _Report) -> Condition:
    condition = Condition(raw["key"], _strings(raw, "values"), _strings(raw, "notValues"))
    key_problem = check_condition_key(condition.key)
    report.error(f"{path}.key", key_problem)
    if not condition.values and not condition.not_values:
        report.error(path, f"at least one of `values` or `notValues` must be set for {raw['key']}")
    if key_problem is None:
        for name in ("values", "notValues"):
            for index, value in enumerate(_strings(raw, name)):
                report.error(f"{path}.{name}[{index}]", check_condition_value(condition.key, value))
    return condition


def _any_port(rule: Rule) -> bool:
    """True if the rule can match on every port (no positive `ports`, no destination.port)."""
    by_operation = bool(rule.operations) and all(op.ports for op in rule.operations)
    by_condition = any(c.key == "destination.port" and c.values for c in rule.conditions)
    return not (by_operation or by_condition)


def _rule(raw: Mapping[str, Any], path: str, report: _Report) -> Rule:
    for part in ("from", "to"):
        if part in raw and not raw[part]:
            report.error(f"{path}.{part}", f"`{part}` must not be empty: omit it to match any")
    return Rule(
        sources=tuple(
            _source(item["source"], f"{path}.from[{i}].source", report)
            for i, item in enumerate(raw.get("from", ()))
        ),
        operations=tuple(
            _operation(item["operation"], f"{path}.to[{i}].operation", report)
            for i, item in enumerate(raw.get("to", ()))
        ),
        conditions=tuple(
            _condition(item, f"{path}.when[{i}]", report)
            for i, item in enumerate(raw.get("when", ()))
        ),
    )


TRUE_WORDS = ("1", "t", "T", "TRUE", "true", "True")
FALSE_WORDS = ("0", "f", "F", "FALSE", "false", "False")
DRY_RUN = "istio.io/dry-run"


def _authorization(
    name: str, namespace: str, raw: Mapping[str, Any], report: _Report
) -> AuthorizationPolicy:
    spec = raw.get("spec", {})
    dry_run = raw["metadata"].get("annotations", {}).get(DRY_RUN)
    if dry_run in TRUE_WORDS:
        report.error(
            f"metadata.annotations[{DRY_RUN}]",
            "dry-run policies are not supported by Ferry (it would enforce them); remove the "
            "policy or use action AUDIT",
        )
    elif dry_run is not None and dry_run not in FALSE_WORDS:
        report.error(f"metadata.annotations[{DRY_RUN}]", f"{dry_run!r} is not true or false")
    action = spec.get("action", "ALLOW")
    if action == "CUSTOM":
        report.error(
            "spec.action",
            "CUSTOM (external authorization through an extension provider) is not supported by "
            "Ferry; use ALLOW, DENY or AUDIT",
        )
    elif "provider" in spec:
        report.error("spec.provider", f"`provider` must not be set with action {action}")
    if action == "DENY" and "rules" not in spec:
        report.error(
            "spec.rules",
            "DENY without `rules` is meaningless as it never matches; add an empty rule `{}` "
            "to deny every request",
        )
    rules = tuple(
        _rule(item, f"spec.rules[{i}]", report) for i, item in enumerate(spec.get("rules", ()))
    )
    for index, rule in enumerate(rules):
        if action == "DENY" and rule_uses_http(rule) and _any_port(rule):
            report.warn(
                f"spec.rules[{index}]",
                "this DENY rule uses HTTP attributes on every port: the selected workloads get "
                "HTTP inspection on all ports and their traffic that is not HTTP is denied; "
                "set `ports` to limit it",
            )
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        selector=_selector(spec, report),
        action="DENY" if action == "DENY" else "AUDIT" if action == "AUDIT" else "ALLOW",
        rules=rules,
    )


def _authentication(
    name: str, namespace: str, raw: Mapping[str, Any], report: _Report
) -> RequestAuthentication:
    spec = raw.get("spec", {})
    rules = []
    for index, item in enumerate(spec.get("jwtRules", ())):
        try:
            rules.append(JwtRule.from_spec(item))
        except ValueError as exc:
            report.error(f"spec.jwtRules[{index}]", str(exc))
    return RequestAuthentication(
        name=name, namespace=namespace, selector=_selector(spec, report), jwt_rules=tuple(rules)
    )


def _rate_limit(
    name: str, namespace: str, raw: Mapping[str, Any], report: _Report
) -> RateLimitPolicy:
    spec = raw["spec"]
    try:
        parse_rules(spec, namespace=namespace, name=name)
    except RateLimitError as exc:  # its message starts with the field path
        path, _, reason = str(exc).partition(": ")
        if path.startswith("spec."):
            report.error(path, reason)
        else:
            report.error("spec", str(exc))
    return RateLimitPolicy(name, namespace, _selector(spec, report), spec)


Builder: TypeAlias = Callable[[str, str, Mapping[str, Any], _Report], Document]
BUILDERS: dict[str, Builder] = {
    "AuthorizationPolicy": _authorization,
    "RequestAuthentication": _authentication,
    "RateLimitPolicy": _rate_limit,
}


@dataclass(frozen=True)
class Parsed:
    """One document's outcome: the document if it is valid, and what was found."""

    document: Document | None
    label: str  # how errors name it: "AuthorizationPolicy ns/name" or "document #3"
    errors: tuple[PolicyError, ...] = ()
    warnings: tuple[PolicyError, ...] = ()


def parse_document(raw: Any, *, file: str, index: int) -> Parsed:
    """Validate one decoded document (schema, then semantics) into a typed document.  `file` and
    `index` (0-based position in the file) only name it in errors."""
    label = f"document #{index + 1}"
    if not isinstance(raw, dict):
        reason = f"expected a mapping (a Kubernetes-style object), got {type(raw).__name__}"
        return Parsed(None, label, (PolicyError(file, label, "", reason),))
    try:
        raw = _prune_nulls(raw)
    except _Unusable as exc:
        return Parsed(None, label, (PolicyError(file, label, "", str(exc)),))
    kind = raw.get("kind")
    metadata = raw.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
        namespace = metadata.get("namespace", DEFAULT_NAMESPACE)
        label = f"{kind} {namespace if isinstance(namespace, str) else '?'}/{metadata['name']}"
    if not isinstance(kind, str) or kind not in KINDS:
        reason = f"unknown kind {kind!r}; Ferry reads {', '.join(KINDS)}"
        return Parsed(None, label, (PolicyError(file, label, "kind", reason),))
    report = _Report(file, label)
    for error in sorted(validator(kind).iter_errors(raw), key=lambda e: list(e.absolute_path)):
        report.error(_path(error.absolute_path), _schema_reason(error))
    if report.errors:
        return Parsed(None, label, tuple(report.errors))
    namespace = raw["metadata"].get("namespace", DEFAULT_NAMESPACE)
    document = BUILDERS[kind](raw["metadata"]["name"], namespace, raw, report)
    valid = None if report.errors else document
    return Parsed(valid, label, tuple(report.errors), tuple(report.warnings))


# --- files and directories ---------------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """What a set of files holds: every valid document, and every problem found."""

    documents: tuple[Document, ...]
    errors: tuple[PolicyError, ...]
    warnings: tuple[PolicyError, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: faster


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where (lines of the file, from 1)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem and exc.problem_mark:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def parse_text(text: str, file: str) -> list[Parsed]:
    """Every document of one YAML text (empty documents skipped); a YAML syntax error ends the
    file with an error naming the document it broke and the line."""
    parsed: list[Parsed] = []
    index = 0
    try:
        for raw in yaml.load_all(text, Loader=LOADER):
            if raw is not None:
                parsed.append(parse_document(raw, file=file, index=index))
            index += 1
    except yaml.YAMLError as exc:
        label = f"document #{index + 1}"
        reason = f"not valid YAML: {_yaml_problem(exc)}"
        parsed.append(Parsed(None, label, (PolicyError(file, label, "", reason),)))
    return parsed


def combine(parsed: Iterable[tuple[Parsed, str]]) -> Loaded:
    """Gather documents and problems; a (kind, namespace, name) seen again is an error there."""
    documents: list[Document] = []
    errors: list[PolicyError] = []
    warnings: list[PolicyError] = []
    seen: dict[tuple[str, str, str], str] = {}
    for item, file in parsed:
        errors.extend(item.errors)
        warnings.extend(item.warnings)
        document = item.document
        if document is None:
            continue
        key = (document.kind, document.namespace, document.name)
        if key in seen:
            errors.append(
                PolicyError(file, item.label, "metadata.name", f"duplicate: also in {seen[key]}")
            )
            continue
        seen[key] = file
        documents.append(document)
    return Loaded(tuple(documents), tuple(errors), tuple(warnings))


def policy_files(directory: Path) -> list[Path]:
    """The files of a policy directory, by name: `*.yaml`, `*.yml`, `*.json`, symlinks followed,
    names starting with "." skipped (a mounted ConfigMap's `..data` machinery), not recursive."""
    return sorted(
        path
        for path in directory.iterdir()
        if not path.name.startswith(".") and path.suffix in POLICY_SUFFIXES and path.is_file()
    )


def load_files(paths: Sequence[Path]) -> Loaded:
    """Load files (any name) and directories (their `policy_files`) together."""
    parsed: list[tuple[Parsed, str]] = []
    for path in paths:
        try:
            files = policy_files(path) if path.is_dir() else [path]
            for file in files:
                parsed.extend((item, str(file)) for item in parse_text(file.read_text(), str(file)))
        except (OSError, UnicodeDecodeError) as exc:
            reason = f"cannot read: {getattr(exc, 'strerror', None) or exc}"
            parsed.append((Parsed(None, "", (PolicyError(str(path), "", "", reason),)), ""))
    return combine(parsed)


def load_directory(directory: Path) -> Loaded:
    """Load a policy directory (`policy.directory`).  A missing or unreadable directory is an
    error (the agent keeps its last good set), not an empty set: a vanished mount must not open
    everything up."""
    if not directory.is_dir():
        reason = "not a directory (missing or unreadable)"
        return Loaded((), (PolicyError(str(directory), "", "", reason),))
    return load_files([directory])


# --- encoding (typed -> canonical dict) ---------------------------------------------------------


def _fields(value: Any, names: Sequence[tuple[str, str]]) -> dict[str, Any]:
    return {key: list(getattr(value, name)) for key, name in names if getattr(value, name)}


def _spec_selector(document: Document) -> dict[str, Any]:
    return {"selector": {"matchLabels": dict(document.selector)}} if document.selector else {}


def _encode_rule(rule: Rule) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if rule.sources:
        raw["from"] = [{"source": _fields(s, SOURCE_FIELDS)} for s in rule.sources]
    if rule.operations:
        raw["to"] = [{"operation": _fields(o, OPERATION_FIELDS)} for o in rule.operations]
    if rule.conditions:
        raw["when"] = [
            {"key": c.key}
            | ({"values": list(c.values)} if c.values else {})
            | ({"notValues": list(c.not_values)} if c.not_values else {})
            for c in rule.conditions
        ]
    return raw


def encode(document: Document) -> dict[str, Any]:
    """The canonical Kubernetes-shaped form of a document (JSON-ready); `parse_document` of it
    gives back an equal document."""
    spec = _spec_selector(document)
    if isinstance(document, AuthorizationPolicy):
        spec["action"] = document.action
        spec["rules"] = [_encode_rule(rule) for rule in document.rules]
    elif isinstance(document, RequestAuthentication):
        spec["jwtRules"] = [rule.to_spec() for rule in document.jwt_rules]
    else:
        spec = dict(document.spec)
    return {
        "apiVersion": KINDS[document.kind][1],
        "kind": document.kind,
        "metadata": {"name": document.name, "namespace": document.namespace},
        "spec": spec,
    }
