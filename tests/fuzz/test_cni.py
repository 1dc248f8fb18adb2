"""Structured fuzzing of the CNI plugin's input: invocations built field by field (environment,
CNI_ARGS, network config with prevResult and Ferry's keys) through `fuzz.targets.cni`, and the
primary CNI's configuration files through `fuzz.targets.cni_conflist` (their contracts are in
those modules).

The byte-level side is `tests/unit/test_cni_protocol.py` (any bytes, any config of Ferry's keys)
and the corpus mutations of `test_corpus.py`.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from agent.cni_conflist import plugin_entry
from agent.cni_protocol import CNI_VERSIONS, COMMANDS, ENV_NAMES, SETTINGS_KEYS
from fuzz.targets import cni, cni_conflist
from tests.fuzz.strategies import FUZZ, json_values

_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=24)
_ARG = st.sampled_from(("K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_UID", "IgnoreUnknown", ""))
_CNI_ARGS = st.lists(st.tuples(_ARG, _TEXT.filter(lambda v: ";" not in v)), max_size=5).map(
    lambda pairs: ";".join(f"{k}={v}" if k else v for k, v in pairs)
)
_IPS = st.lists(
    st.fixed_dictionaries({"address": st.ip_addresses().map(lambda a: f"{a}/24") | json_values}),
    max_size=3,
)
_PREV = st.fixed_dictionaries({"cniVersion": st.sampled_from(CNI_VERSIONS)}, optional={"ips": _IPS})
_CONFIG = st.fixed_dictionaries(
    {"cniVersion": st.sampled_from(CNI_VERSIONS) | json_values},
    optional={
        "name": _TEXT | json_values,
        "type": st.just("ferry-cni"),
        "prevResult": _PREV | json_values,
        **{key: json_values | _TEXT for key in SETTINGS_KEYS},
        "exclude_namespaces": st.lists(_TEXT, max_size=3),
        "labels": st.dictionaries(_TEXT, _TEXT, max_size=3),
    },
)


@FUZZ
@given(
    st.sampled_from(COMMANDS) | _TEXT,
    st.dictionaries(st.sampled_from(ENV_NAMES), _TEXT, max_size=6),
    _CNI_ARGS,
    _CONFIG,
)
def test_cni_invocations(
    command: str, env: dict[str, str], args: str, config: dict[str, object]
) -> None:
    cni.check(cni.invocation(command, config, **(env | {"CNI_ARGS": args})))


_PLUGIN = st.fixed_dictionaries(
    {"type": st.sampled_from(("bridge", "calico", "portmap", "ferry-cni")) | json_values},
    optional={"name": _TEXT, "state_dir": _TEXT, "exclude_namespaces": json_values},
)


@FUZZ
@given(
    st.booleans(),
    st.fixed_dictionaries(
        {},
        optional={
            "cniVersion": st.sampled_from(CNI_VERSIONS) | json_values,
            "name": _TEXT,
            "type": st.sampled_from(("bridge", "ferry-cni")) | json_values,
            "plugins": st.lists(_PLUGIN | st.just(plugin_entry("/run/ferry", ["kube-system"])))
            | json_values,
        },
    ),
)
def test_cni_conflists(conf: bool, document: dict[str, object]) -> None:
    cni_conflist.check(bytes([conf]) + json.dumps(document).encode())
