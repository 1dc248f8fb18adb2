"""The CNI plugin's wire and the enrollment seam, as tables (pure: no agent, no kernel).

`parse_invocation` is what the agent makes of the bytes `ferry-cni` forwards: the accepted
shapes (spec versions 0.3.0 to 1.0.0, kubelet's CNI_ARGS, DEL without a netns) and every refusal
with its CNI error code and a message naming the bad value.  The replies are what the plugin
prints: prevResult unchanged, or the spec's error object.  The standalone decider enrolls with
the identity CNI_ARGS and the plugin settings give; excluded namespaces are skipped first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cni_enroll import (
    Enroll,
    Skip,
    StandaloneDecider,
    excluded,
    pod_ref,
    workload_name,
)
from agent.cni_protocol import (
    DECODING_FAILED,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    CniError,
    Invocation,
    PluginSettings,
    error_reply,
    ok_reply,
    parse_invocation,
)

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
            {"address": "fd00::5/64", "interface": 0}],
}  # fmt: skip
KUBELET_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
    "K8S_POD_INFRA_CONTAINER_ID=3f2a9c;K8S_POD_UID=0d6f-11"
)


def invocation(
    command: str = "ADD",
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> bytes:
    values = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "3f2a9c",
        "CNI_NETNS": "/var/run/netns/cni-1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": KUBELET_ARGS,
        "CNI_PATH": "/opt/cni/bin",
        **(env or {}),
    }
    body = config if config is not None else {
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ferry-cni", "prevResult": PREV,
    }  # fmt: skip
    head = "".join(f"{k}={v}\n" for k, v in values.items())
    return f"{head}\n".encode() + json.dumps(body).encode()


def test_a_kubelet_add_is_parsed() -> None:
    parsed = parse_invocation(invocation())
    assert parsed.command == "ADD" and parsed.container_id == "3f2a9c"
    assert parsed.netns == "/var/run/netns/cni-1" and parsed.cni_version == "1.0.0"
    assert parsed.arg("K8S_POD_NAME") == "web-0" and parsed.arg("missing") == ""
    assert parsed.prev_result == PREV
    assert parsed.settings == PluginSettings()
    pod = pod_ref(parsed)
    assert (pod.name, pod.namespace, pod.uid, pod.infra_container_id) == (
        "web-0", "shop", "0d6f-11", "3f2a9c",
    )  # fmt: skip
    assert pod.ips == ("10.1.0.5", "fd00::5")
    assert pod.describe() == "shop/web-0" and workload_name(pod) == "web-0"


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_every_supported_version_passes_prev_result_through_unchanged(version: str) -> None:
    prev = {**PREV, "cniVersion": version}
    config = {"cniVersion": version, "name": "n", "type": "ferry-cni", "prevResult": prev}
    reply = ok_reply(parse_invocation(invocation(config=config)))
    code, _, stdout = reply.partition(b"\n")
    assert code == b"0" and json.loads(stdout) == prev


def test_del_and_check_print_nothing_and_del_needs_no_netns() -> None:
    assert ok_reply(parse_invocation(invocation("CHECK"))) == b"0\n"
    parsed = parse_invocation(invocation("DEL", env={"CNI_NETNS": "", "CNI_IFNAME": ""}))
    assert parsed.netns == "" and ok_reply(parsed) == b"0\n"


def test_an_add_without_prev_result_answers_an_empty_result_of_its_version() -> None:
    config = {"cniVersion": "0.4.0", "name": "n", "type": "ferry-cni"}
    reply = ok_reply(parse_invocation(invocation(config=config)))
    assert reply == b'0\n{"cniVersion": "0.4.0"}\n'


def test_plugin_settings_are_read() -> None:
    config = {
        "cniVersion": "1.0.0", "name": "n", "type": "ferry-cni", "state_dir": "/run/f2",
        "timeout": 5, "exclude_namespaces": ["infra"], "namespace": "edge",
        "service_account": "gw", "labels": {"app": "gw"},
    }  # fmt: skip
    settings = parse_invocation(invocation(config=config)).settings
    assert settings == PluginSettings("/run/f2", 5.0, ("infra",), "edge", "gw", (("app", "gw"),))


REFUSALS = [
    # (what, invocation bytes, CNI code, text the message must hold)
    ("no empty line", b"CNI_COMMAND=ADD\n", DECODING_FAILED, "empty line"),
    ("unknown variable", b"EVIL=1\n\n{}", DECODING_FAILED, "'EVIL=1'"),
    ("not UTF-8", b"CNI_COMMAND=\xff\n\n{}", DECODING_FAILED, "not UTF-8"),
    ("VERSION here", invocation("VERSION"), INVALID_ENVIRONMENT, "'VERSION'"),
    ("bad container id", invocation(env={"CNI_CONTAINERID": "a b"}), INVALID_ENVIRONMENT, "'a b'"),
    ("empty container id", invocation(env={"CNI_CONTAINERID": ""}), INVALID_ENVIRONMENT, "''"),
    ("relative netns", invocation(env={"CNI_NETNS": "cni-1"}), INVALID_ENVIRONMENT, "'cni-1'"),
    ("add without netns", invocation(env={"CNI_NETNS": ""}), INVALID_ENVIRONMENT, "CNI_NETNS"),
    ("add without ifname", invocation(env={"CNI_IFNAME": ""}), INVALID_ENVIRONMENT, "CNI_IFNAME"),
    ("bad CNI_ARGS", invocation(env={"CNI_ARGS": "a=1;junk"}), INVALID_ENVIRONMENT, "'junk'"),
    ("not JSON", invocation().partition(b"\n\n")[0] + b"\n\n{", DECODING_FAILED, "not JSON"),
    ("not an object", invocation(config=[]), DECODING_FAILED, "[]"),  # type: ignore[arg-type]
    ("old version", invocation(config={"cniVersion": "0.2.0"}), INCOMPATIBLE_VERSION, "'0.2.0'"),
    ("no version", invocation(config={"name": "n"}), INCOMPATIBLE_VERSION, "None"),
    ("prevResult a list",
     invocation(config={"cniVersion": "1.0.0", "prevResult": []}), INVALID_CONFIG, "[]"),
    ("relative state_dir",
     invocation(config={"cniVersion": "1.0.0", "state_dir": "run"}), INVALID_CONFIG, "'run'"),
    ("timeout a string",
     invocation(config={"cniVersion": "1.0.0", "timeout": "5"}), INVALID_CONFIG, "'5'"),
    ("exclusions not a list",
     invocation(config={"cniVersion": "1.0.0", "exclude_namespaces": "kube-system"}),
     INVALID_CONFIG, "'kube-system'"),
    ("bad service account",
     invocation(config={"cniVersion": "1.0.0", "service_account": "Web"}), INVALID_CONFIG, "'Web'"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "data", "code", "text"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_carry_the_cni_code_and_name_the_value(
    what: str, data: bytes, code: int, text: str
) -> None:
    with pytest.raises(CniError) as refused:
        parse_invocation(data)
    assert refused.value.code == code
    assert text in str(refused.value)


def test_an_error_reply_is_the_spec_error_object() -> None:
    reply = error_reply(11, "pod not started", "the agent is busy", "0.4.0")
    code, _, stdout = reply.partition(b"\n")
    assert code == b"1"
    assert json.loads(stdout) == {
        "cniVersion": "0.4.0", "code": 11, "msg": "pod not started", "details": "the agent is busy",
    }  # fmt: skip


def parsed(pod_namespace: str, **config: Any) -> Invocation:
    body = {"cniVersion": "1.0.0", "name": "n", "type": "ferry-cni", **config}
    args = f"K8S_POD_NAMESPACE={pod_namespace};K8S_POD_NAME=p" if pod_namespace else ""
    return parse_invocation(invocation(config=body, env={"CNI_ARGS": args}))


def test_the_standalone_decider_enrolls_with_the_identity_it_is_given() -> None:
    decider = StandaloneDecider()
    pod = pod_ref(parsed("shop", service_account="web", labels={"app": "web"}))
    assert asyncio.run(decider.decide(pod, 1.0)) == Enroll("shop", "web", {"app": "web"})
    plain = pod_ref(parsed("", namespace="edge"))  # no Kubernetes: the plugin's namespace
    assert asyncio.run(decider.decide(plain, 1.0)) == Enroll("edge", "default", {})
    assert workload_name(plain) == "cni-3f2a9c" and plain.describe() == "sandbox 3f2a9c"


@pytest.mark.parametrize(
    ("namespace", "config", "skipped"),
    [
        ("kube-system", {}, True),
        ("ferry-system", {}, True),
        ("shop", {}, False),
        ("", {}, False),  # unknown namespace: never taken for an excluded one
        ("kube-system", {"exclude_namespaces": []}, False),
        ("infra", {"exclude_namespaces": ["infra"]}, True),
    ],
)
def test_excluded_namespaces(namespace: str, config: dict[str, Any], skipped: bool) -> None:
    skip = excluded(pod_ref(parsed(namespace, **config)))
    assert (skip is not None) == skipped
    if skip is not None:
        assert isinstance(skip, Skip) and repr(namespace) in skip.reason


HEAD = invocation().partition(b"\n\n")[0] + b"\n\n"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_parsed_or_refused_with_a_cni_error(data: bytes) -> None:
    with contextlib.suppress(CniError):
        parse_invocation(data)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.sampled_from(["cniVersion", "name", "prevResult", "state_dir",
                                        "timeout", "exclude_namespaces", "namespace",
                                        "service_account", "labels", "type"]), JSON))  # fmt: skip
def test_any_config_is_parsed_or_refused_and_an_add_replies(config: dict[str, Any]) -> None:
    try:
        parsed = parse_invocation(HEAD + json.dumps(config).encode())
    except CniError as exc:
        assert 1 <= exc.code <= 11
        return
    code, _, stdout = ok_reply(parsed).partition(b"\n")
    assert code == b"0" and isinstance(json.loads(stdout), dict)
