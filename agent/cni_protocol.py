"""The CNI plugin's wire: what `ferry-cni` forwards to the agent, and what it relays back (pure).

`ferry-cni` (cni/ferry-cni.c) is the executable a container runtime runs after the primary CNI
plugin.  It decides nothing: it sends the agent its whole invocation over `<state-dir>/cni.sock`
and prints what the agent answers.  One connection carries one invocation:

    request   the CNI environment, one `NAME=value` line each (CNI_COMMAND, CNI_CONTAINERID,
              CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH), an empty line, then the network
              config exactly as the runtime wrote it on the plugin's stdin; then EOF
    reply     `<exit code>\\n`, then the bytes the plugin prints on stdout; then EOF

`parse_invocation(data)` turns the request bytes into an `Invocation` or raises `CniError`
carrying the CNI error code (spec 1.0.0, "Well-known error codes") and a message that names the
bad value; it is the fuzz target for the plugin's input.  It checks what the spec asks of a
plugin: a command it knows, a container id, a netns and an interface for ADD and CHECK, a config
that is one JSON object with a `cniVersion` this plugin supports (0.3.0, 0.3.1, 0.4.0, 1.0.0:
the result shapes agree on everything Ferry reads, the addresses in `ips`) and a `prevResult`
that is an object when present, plus Ferry's own keys (`PluginSettings`).  `CNI_ARGS` is the
runtime's `K=V;K=V` list (kubelet passes K8S_POD_NAME, K8S_POD_NAMESPACE, K8S_POD_UID and
K8S_POD_INFRA_CONTAINER_ID there).

The replies are built here too: `passed_through` (an ADD's result is prevResult unchanged: the
plugin changes no interface or address), `error_reply` (the spec's error object, exit 1) and
`ok_reply`.  The agent's adapter (`agent.cni_service`) reads and writes the socket.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.names import InvalidName, dns_label
from agent.names import labels as checked_labels

CNI_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK")
ENV_NAMES = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
DEFAULT_EXCLUDED = ("kube-system", "ferry-system")  # the C plugin has the same default
DEFAULT_STATE_DIR = "/run/ferry"
MAX_INVOCATION = 4 << 20  # bytes; the plugin reads at most this much config
SOCKET_NAME = "cni.sock"

# Well-known CNI error codes (spec 1.0.0), and Ferry's own (100 and up).
INCOMPATIBLE_VERSION = 1
INVALID_ENVIRONMENT = 4
DECODING_FAILED = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
ENROLLMENT_FAILED = 100
NOT_PROTECTED = 101

CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
SETTINGS_KEYS = (
    "state_dir",
    "timeout",
    "exclude_namespaces",
    "namespace",
    "service_account",
    "labels",
)


class CniError(ValueError):
    """An invocation the plugin must refuse; `code` is the CNI error code for the reply."""

    def __init__(self, code: int, message: str, details: str = "") -> None:
        super().__init__(f"{message}: {details}" if details else message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class PluginSettings:
    """Ferry's keys in its entry of the conflist (all optional)."""

    state_dir: str = DEFAULT_STATE_DIR  # where the agent's cni.sock is
    timeout: float = 30.0  # seconds the plugin waits for the agent's answer
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED  # never enrolled; start if agent down
    namespace: str = "default"  # standalone identity when CNI_ARGS names no pod namespace
    service_account: str = "default"  # standalone identity (Kubernetes: from the pod)
    labels: tuple[tuple[str, str], ...] = ()  # standalone: labels for policy selectors


@dataclass(frozen=True)
class Invocation:
    """One run of the plugin, as the runtime made it."""

    command: str  # ADD | DEL | CHECK (VERSION never reaches the agent)
    container_id: str
    netns: str  # may be empty for DEL (the namespace may be gone)
    ifname: str
    args: tuple[tuple[str, str], ...]  # CNI_ARGS, in order
    cni_version: str
    network: str  # the conflist's name
    prev_result: Mapping[str, Any] | None
    settings: PluginSettings

    def arg(self, key: str) -> str:
        """The CNI_ARGS value of `key` ("" when absent; the last one when repeated)."""
        found = ""
        for name, value in self.args:
            if name == key:
                found = value
        return found


def parse_invocation(data: bytes) -> Invocation:
    """The invocation `ferry-cni` forwarded (see the module doc), or `CniError` naming what is
    wrong with it."""
    if len(data) > MAX_INVOCATION:
        raise CniError(DECODING_FAILED, "invocation too large", f"{len(data)} bytes")
    head, blank, body = data.partition(b"\n\n")
    if not blank:
        raise CniError(DECODING_FAILED, "invocation without the empty line after the environment")
    env = _environment(head)
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            INVALID_ENVIRONMENT, "unknown CNI_COMMAND", f"{command!r}: expected ADD, DEL or CHECK"
        )
    container_id = env.get("CNI_CONTAINERID", "")
    if not CONTAINER_ID.fullmatch(container_id):
        raise CniError(
            INVALID_ENVIRONMENT,
            "invalid CNI_CONTAINERID",
            f"{container_id!r:.100}: must be letters, digits, '_', '.' and '-'",
        )
    netns = env.get("CNI_NETNS", "")
    ifname = env.get("CNI_IFNAME", "")
    if (command != "DEL" or netns) and not netns.startswith("/"):
        raise CniError(INVALID_ENVIRONMENT, "invalid CNI_NETNS", f"{netns!r:.200}: must be a path")
    if command != "DEL" and not ifname:
        raise CniError(INVALID_ENVIRONMENT, "CNI_IFNAME is not set", f"{command} needs it")
    config = _config(body)
    version = config.get("cniVersion")
    if not isinstance(version, str) or version not in CNI_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            f"cniVersion {version!r:.40} is not one of {', '.join(CNI_VERSIONS)}",
        )
    name = config.get("name", "")
    if not isinstance(name, str):
        raise CniError(INVALID_CONFIG, "invalid network name", f"name {name!r:.80}")
    prev = config.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(
            INVALID_CONFIG, "invalid prevResult", f"{prev!r:.80}: must be a result object"
        )
    return Invocation(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=parse_cni_args(env.get("CNI_ARGS", "")),
        cni_version=version,
        network=name,
        prev_result=prev,
        settings=parse_settings(config),
    )


def _environment(head: bytes) -> dict[str, str]:
    env: dict[str, str] = {}
    try:
        text = head.decode()
    except UnicodeDecodeError as exc:
        raise CniError(DECODING_FAILED, "the CNI environment is not UTF-8", str(exc)) from None
    for line in text.split("\n"):
        name, equals, value = line.partition("=")
        if not equals or name not in ENV_NAMES:
            raise CniError(
                DECODING_FAILED, "unexpected line in the CNI environment", f"{line!r:.80}"
            )
        env[name] = value
    return env


def _config(body: bytes) -> dict[str, Any]:
    try:
        config = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; nested deeply
        raise CniError(DECODING_FAILED, "the network config is not JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(
            DECODING_FAILED, "the network config is not a JSON object", f"{config!r:.80}"
        )
    return config


def parse_cni_args(text: str) -> tuple[tuple[str, str], ...]:
    """CNI_ARGS (`IgnoreUnknown=1;K8S_POD_NAME=web;...`) as (key, value) pairs."""
    pairs = []
    for item in text.split(";"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CniError(
                INVALID_ENVIRONMENT, "invalid CNI_ARGS", f"{item!r:.80} is not KEY=VALUE"
            )
        pairs.append((key, value))
    return tuple(pairs)


def parse_settings(config: Mapping[str, Any]) -> PluginSettings:
    """Ferry's keys of the plugin config (`PluginSettings`), each checked, naming a bad one."""
    defaults = PluginSettings()
    state_dir = config.get("state_dir", defaults.state_dir)
    if not isinstance(state_dir, str) or not state_dir.startswith("/"):
        raise CniError(INVALID_CONFIG, "invalid state_dir", f"{state_dir!r:.200}: an absolute path")
    timeout = config.get("timeout", defaults.timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 3600:
        raise CniError(INVALID_CONFIG, "invalid timeout", f"{timeout!r:.40}: seconds, 0 to 3600")
    excluded = config.get("exclude_namespaces", list(defaults.exclude_namespaces))
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise CniError(
            INVALID_CONFIG, "invalid exclude_namespaces", f"{excluded!r:.80}: a list of names"
        )
    try:
        namespace = dns_label("namespace", config.get("namespace", defaults.namespace))
        account = dns_label(
            "service account", config.get("service_account", defaults.service_account)
        )
        labels = checked_labels(config.get("labels", {}))
    except InvalidName as exc:
        raise CniError(INVALID_CONFIG, "invalid plugin setting", str(exc)) from None
    return PluginSettings(state_dir, float(timeout), tuple(excluded), namespace, account, labels)


def result_ips(result: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The addresses (without prefix length) in a result's `ips`; malformed entries skipped."""
    if result is None:
        return ()
    entries = result.get("ips")
    found = []
    for entry in entries if isinstance(entries, list) else []:
        address = entry.get("address") if isinstance(entry, dict) else None
        if isinstance(address, str) and address:
            found.append(address.partition("/")[0])
    return tuple(found)


def reply(exit_code: int, stdout: bytes = b"") -> bytes:
    """The reply frame: the plugin exits with `exit_code` after printing `stdout`."""
    return b"%d\n" % exit_code + stdout


def passed_through(invocation: Invocation) -> bytes:
    """An ADD's result: prevResult unchanged (or an empty result of the config's version)."""
    result = invocation.prev_result
    if result is None:
        result = {"cniVersion": invocation.cni_version}
    return json.dumps(result).encode() + b"\n"


def ok_reply(invocation: Invocation) -> bytes:
    """Success: an ADD prints its result; DEL and CHECK print nothing."""
    return reply(0, passed_through(invocation) if invocation.command == "ADD" else b"")


def error_reply(code: int, message: str, details: str = "", version: str = "1.0.0") -> bytes:
    """Failure: the spec's error object on stdout, exit status 1."""
    body = {"cniVersion": version, "code": code, "msg": message}
    if details:
        body["details"] = details
    return reply(1, json.dumps(body).encode() + b"\n")
