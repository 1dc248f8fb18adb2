"""The CNI plugin's input (`agent.cni_protocol`): what `ferry-cni` forwards from the runtime.

Input: the invocation, the CNI environment lines, an empty line and the network config, as the
plugin writes it to `cni.sock`.  Contract: `parse_invocation` raises nothing but `CniError`
(with a CNI error code); an invocation that parses becomes a pod (`agent.cni_enroll`) and a
standalone decision without an exception, and its success reply is exit status 0 followed, for
an ADD, by prevResult unchanged (JSON that decodes to the same value).
"""

from __future__ import annotations

import json
import math
from typing import Any

from agent.cni_enroll import excluded, pod_ref, standalone_decision, workload_name
from agent.cni_protocol import ENV_NAMES, CniError, error_reply, ok_reply, parse_invocation
from fuzz.harness import main

PREV = {  # what a bridge + host-local primary hands on, IPv4 and IPv6
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0"}, {"name": "veth1", "mac": "02:42:ac:11:00:02"},
                   {"name": "eth0", "sandbox": "/proc/4242/ns/net"}],
    "ips": [{"address": f"{ip}/{bits}", "interface": 2} for ip, bits in (("10.2.0.7", 16),
                                                                         ("fd00:2::7", 64))],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.2.0.1"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["shop.svc.cluster.local"]},
}  # fmt: skip
KUBELET_ARGS = ";".join(
    f"{key}={value}"
    for key, value in (
        ("IgnoreUnknown", "1"),
        ("K8S_POD_NAMESPACE", "shop"),
        ("K8S_POD_NAME", "cart-7d9f"),
        ("K8S_POD_INFRA_CONTAINER_ID", "9e1c"),
        ("K8S_POD_UID", "5b2e-44"),
    )
)


def _same(a: Any, b: Any) -> bool:
    """JSON values equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check(data: bytes) -> None:
    try:
        invocation = parse_invocation(data)
    except CniError as exc:
        assert exc.code > 0, exc
        assert error_reply(exc.code, exc.message, exc.details).startswith(b"1\n")
        return
    pod = pod_ref(invocation)
    excluded(pod)
    standalone_decision(pod)
    workload_name(pod)
    status, _, printed = ok_reply(invocation).partition(b"\n")
    assert status == b"0", status
    if invocation.command == "ADD":
        expected = invocation.prev_result or {"cniVersion": invocation.cni_version}
        assert _same(json.loads(printed), expected), printed
    else:
        assert printed == b"", printed


def invocation(command: str, config: object, **env: str) -> bytes:
    """The bytes ferry-cni forwards for a runtime's call (`env` overrides the defaults)."""
    values = dict(zip(ENV_NAMES, (command, "9e1c", "/proc/4242/ns/net", "eth0", KUBELET_ARGS,
                                  "/opt/cni/bin"), strict=True)) | env  # fmt: skip
    return (
        "".join(f"{k}={v}\n" for k, v in values.items()).encode()
        + b"\n"
        + json.dumps(config).encode()
    )


def seeds() -> dict[str, bytes]:
    config = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ferry-cni"}
    settings = {
        "state_dir": "/run/ferry",
        "timeout": 5,
        "exclude_namespaces": ["kube-system"],
        "namespace": "shop",
        "service_account": "web",
        "labels": {"app": "web"},
    }
    return {
        "add": invocation("ADD", config | {"prevResult": PREV}),
        "add-settings": invocation("ADD", config | settings | {"prevResult": PREV}),
        "add-no-prev": invocation("ADD", config | {"cniVersion": "0.3.1"}),
        "del-no-netns": invocation("DEL", config, CNI_NETNS=""),
        "check": invocation("CHECK", config | {"cniVersion": "0.4.0", "prevResult": PREV}),
        "bad-version": invocation("ADD", config | {"cniVersion": "2.0.0"}),
        "bad-args": invocation("ADD", config, CNI_ARGS="K8S_POD_NAME"),
        "bad-label": invocation("ADD", config | {"labels": {"-x": "y"}}),
        "no-blank-line": b"CNI_COMMAND=ADD\n{}",
        "nested": invocation("ADD", config)[:-1] + b', "prevResult": ' + b"[" * 40,
    }


if __name__ == "__main__":
    main(check)
