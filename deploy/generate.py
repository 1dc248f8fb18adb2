"""Generate the CustomResourceDefinitions under deploy/ from the policy JSON Schemas.

`python -m deploy.generate` writes them; `tests/deploy/test_manifests.py` fails when a file on
disk differs from what this module makes, so a schema change cannot ship without its CRD.

- `RateLimitPolicy` (`ferry.dev/v1alpha1`, `deploy/base/crd-ratelimitpolicy.yaml`): its
  OpenAPI v3 schema IS `agent/policy/schema/ratelimitpolicy.json`, translated by `crd_schema`, a
  pure function.  Kubernetes accepts only a structural subset of JSON Schema in a CRD, so the
  translation changes exactly three things and refuses everything it does not know:
  1. `$schema` and `$id` are dropped (not allowed in a CRD schema);
  2. `additionalProperties: false` is dropped: a CRD may not say it, and the API server prunes
     unknown fields instead (kubectl's default `--validate=strict` refuses them on apply);
  3. the root `metadata` becomes `{type: object}`: the API server validates object metadata
     itself and a CRD schema may not constrain more than its name; and only `spec` stays
     required at the root (apiVersion, kind and metadata always exist there).
  Every other keyword (type, properties, items, required, enum, pattern, bounds, default,
  description) is copied as it is, and a keyword outside that list stops the generation with its
  path, so the CRD can never silently be looser than the schema the agent validates with.
- Istio's `AuthorizationPolicy` and `RequestAuthentication` (`security.istio.io`, v1 and
  v1beta1; `deploy/components/istio-crds/`): Ferry's copy for clusters without Istio.  Their
  `spec` is `x-kubernetes-preserve-unknown-fields`: the copy must accept exactly what Istio's own
  CRDs accept (so objects keep working when Istio is installed later), and the agent validates
  every object against the full schema in `agent/policy/schema/` and reports the bad field.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "agent" / "policy" / "schema"
LABELS = {"app.kubernetes.io/part-of": "ferry"}

# Keywords copied unchanged into the CRD schema (all of them are structural-schema legal).
COPIED = frozenset(
    {
        "type",
        "description",
        "title",
        "properties",
        "items",
        "required",
        "enum",
        "pattern",
        "default",
        "minimum",
        "maximum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "additionalProperties",
    }
)
DROPPED_AT_ROOT = frozenset({"$schema", "$id"})


class SchemaTranslationError(ValueError):
    """The JSON Schema uses something a CRD's structural schema cannot say."""


def crd_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI v3 schema of a CRD for `schema`, a JSON Schema of a whole object."""
    root = {k: v for k, v in schema.items() if k not in DROPPED_AT_ROOT}
    translated = _node(root, "")
    props = dict(translated.get("properties", {}))
    for field in ("apiVersion", "kind"):
        if field in props:
            props[field] = {"type": "string"}
    if "metadata" in props:
        props["metadata"] = {"type": "object"}
    translated["properties"] = props
    required = [name for name in translated.get("required", []) if name == "spec"]
    if required:
        translated["required"] = required
    else:
        translated.pop("required", None)
    return translated


def _node(node: dict[str, Any], path: str) -> dict[str, Any]:
    unknown = sorted(set(node) - COPIED)
    if unknown:
        raise SchemaTranslationError(f"{path or '/'}: {unknown[0]!r} has no CRD equivalent")
    if "type" not in node:
        raise SchemaTranslationError(f"{path or '/'}: a structural schema needs a 'type'")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _node(sub, f"{path}/{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _node(value, f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _node(value, f"{path}/*")
            elif value is not False:
                raise SchemaTranslationError(f"{path or '/'}: additionalProperties: {value!r}")
        else:
            out[key] = value
    return out


def _crd(
    group: str,
    kind: str,
    plural: str,
    versions: list[tuple[str, bool]],
    schema: dict[str, Any],
    short_names: list[str],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": f"{plural}.{group}", "labels": dict(LABELS)}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": metadata,
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["ferry"],
            },
            "versions": [
                {
                    "name": name,
                    "served": True,
                    "storage": storage,
                    "schema": {"openAPIV3Schema": copy.deepcopy(schema)},
                }
                for name, storage in versions
            ],
        },
    }


def rate_limit_policy_crd() -> dict[str, Any]:
    source = json.loads((SCHEMA_DIR / "ratelimitpolicy.json").read_text())
    return _crd(
        "ferry.dev",
        "RateLimitPolicy",
        "ratelimitpolicies",
        [("v1alpha1", True)],
        crd_schema(source),
        ["rlp"],
    )


_PRESERVED: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    },
}
_COPY_NOTE = {
    "ferry.dev/note": "Ferry's copy of Istio's CRD for clusters without Istio; Istio's own CRD "
    "replaces it in place (kubectl apply --server-side --force-conflicts), keeping the objects"
}


def istio_crds() -> list[dict[str, Any]]:
    versions = [("v1", True), ("v1beta1", False)]
    return [
        _crd(
            "security.istio.io",
            kind,
            plural,
            versions,
            _PRESERVED,
            [short],
            _COPY_NOTE,
        )
        for kind, plural, short in (
            ("AuthorizationPolicy", "authorizationpolicies", "ap"),
            ("RequestAuthentication", "requestauthentications", "ra"),
        )
    ]


def rendered() -> dict[Path, str]:
    """Every generated file (path relative to the repository) and its text."""
    header = "# Generated by `python -m deploy.generate` ({source}); do not edit.\n"
    files = {
        Path("deploy/base/crd-ratelimitpolicy.yaml"): header.format(
            source="from agent/policy/schema/ratelimitpolicy.json"
        )
        + _yaml(rate_limit_policy_crd())
    }
    for crd in istio_crds():
        kind = crd["spec"]["names"]["singular"]
        files[Path(f"deploy/components/istio-crds/crd-{kind}.yaml")] = header.format(
            source="Ferry's copy of Istio's CRD"
        ) + _yaml(crd)
    return files


def _yaml(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)


def main() -> int:
    for path, text in rendered().items():
        (REPO / path).write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
