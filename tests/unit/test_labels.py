"""Workload labels: Kubernetes' rules, one sorted immutable form, persisted, configured, enrolled.

The tables are Kubernetes' own cases (`k8s.io/apimachinery/pkg/util/validation`
`IsQualifiedName` / `IsValidLabelValue` tests), so a label Kubernetes accepts is accepted here
and the reverse, with one deliberate difference: a key's prefix is a DNS subdomain by Ferry's one
rule (`agent.names`), which holds each of its labels to 63 characters (Kubernetes checks only the
total of 253).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import names
from agent.config import ConfigError, parse_config
from agent.netns_id import NetnsId
from agent.workloads import (
    EnrollmentError,
    EnrollmentStore,
    Workload,
    check_request,
    new_workload,
)

GOOD_KEYS = [
    "simple",
    "now-with-dashes",
    "1-starts-with-num",
    "1234",
    "simple/simple",
    "now-with-dashes/simple",
    "now-with-dashes/now-with-dashes",
    "now.with.dots/simple",
    "now-with.dashes-and.dots/simple",
    "1-num.2-num/3-num",
    "1234/5678",
    "1.2.3.4/5678",
    "Uppercase_Is_OK_123",
    "example.com/Uppercase_Is_OK_123",
    "app.kubernetes.io/name",
    "a" * 63,
    ".".join(["a" * 63] * 3 + ["a" * 61]) + "/" + "b" * 63,  # a prefix of 253 characters
]
BAD_KEYS = [
    "",
    "nospecialchars%^=@",
    "cantendwithadash-",
    "-cantstartwithadash-",
    "only/one/slash",
    "Example.com/abc",  # the prefix is a lower-case DNS subdomain
    "example_com/abc",
    "example.com/",
    "/simple",
    "a" * 64,
    ".".join(["a" * 63] * 3 + ["a" * 62]) + "/abc",  # a prefix of 254 characters
    "a" * 64 + ".com/abc",  # Ferry's DNS names hold every label to 63 characters
    "example.com/" + "a" * 64,
    "has space",
]
GOOD_VALUES = ["", "simple", "now-with-dashes", "1-starts-with-num", "end-with-num-1", "1234",
               "A.B_C-d", "a" * 63]  # fmt: skip
BAD_VALUES = ["nospecialchars%^=@", "Tama-nui-te-rā.Tama-nui-te-rā", "-x", "x-", "x/y", "a" * 64,
              "has space", 1, None]  # fmt: skip


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_label_keys_kubernetes_accepts(key: str) -> None:
    assert names.label_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_label_keys_kubernetes_refuses_are_refused_by_name(key: str) -> None:
    with pytest.raises(names.InvalidName) as info:
        names.label_key(key)
    assert repr(key) in str(info.value) and "label key" in str(info.value)


@pytest.mark.parametrize("value", GOOD_VALUES)
def test_label_values_kubernetes_accepts(value: str) -> None:
    assert names.label_value("app", value) == value


@pytest.mark.parametrize("value", BAD_VALUES)
def test_label_values_kubernetes_refuses_name_the_label(value: object) -> None:
    with pytest.raises(names.InvalidName) as info:
        names.label_value("app", value)
    assert f"invalid value {value!r} of label 'app'" in str(info.value)


def test_labels_are_sorted_pairs() -> None:
    assert names.labels({"version": "v1", "app": "web", "tier": ""}) == (
        ("app", "web"),
        ("tier", ""),
        ("version", "v1"),
    )
    with pytest.raises(names.InvalidName, match="labels must be a mapping"):
        names.labels(["app=web"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("app=web", ("app", "web")), ("tier=", ("tier", "")), ("a/b=c=d", None), ("app", None),
     ("=web", None), ("app.kubernetes.io/name=web", ("app.kubernetes.io/name", "web"))],
)  # fmt: skip
def test_the_command_line_form(text: str, expected: tuple[str, str] | None) -> None:
    if expected is None:
        with pytest.raises(names.InvalidName, match="label"):
            names.label_assignment(text)
    else:
        assert names.label_assignment(text) == expected


def test_enrollment_requests_check_labels_and_name_the_bad_one() -> None:
    assert check_request("shop", "web", None, {"version": "v1", "app": "web"}) == (
        ("app", "web"),
        ("version", "v1"),
    )
    with pytest.raises(EnrollmentError, match=r"invalid label key 'bad key'"):
        check_request("shop", "web", None, {"bad key": "x"})
    with pytest.raises(EnrollmentError, match=r"invalid value 'x y' of label 'app'"):
        new_workload(Path("/var/run/netns/web"), NetnsId(4, 7), "shop", "web", None, {"app": "x y"})


def test_workload_records_carry_labels_as_an_object_and_old_ones_load_without(
    tmp_path: Path,
) -> None:
    web = new_workload(Path("/var/run/netns/web"), NetnsId(4, 7), "shop", "web", None,
                       {"version": "v1", "app": "web"})  # fmt: skip
    assert web.labels == (("app", "web"), ("version", "v1"))
    assert web.to_json()["labels"] == {"app": "web", "version": "v1"}
    assert Workload.from_json(json.loads(json.dumps(web.to_json()))) == web
    old = {k: v for k, v in web.to_json().items() if k != "labels"}
    assert Workload.from_json(old).labels == ()
    with pytest.raises(EnrollmentError, match="invalid label key 'Bad/x'"):
        Workload.from_json({**web.to_json(), "labels": {"Bad/x": "y"}})
    store = EnrollmentStore(tmp_path)
    store.save({web.uid: web})
    assert store.load() == {web.uid: web}


def test_declared_workloads_take_labels() -> None:
    config = parse_config(
        {"workloads": [{"netns": "web", "namespace": "shop", "service_account": "web",
                        "labels": {"version": "v1", "app": "web"}}]}
    )  # fmt: skip
    assert config.workloads[0].labels == (("app", "web"), ("version", "v1"))
    assert parse_config({"workloads": [{"netns": "a", "namespace": "s", "service_account": "x"}]})
    for labels, needle in [
        ({"app": "x y"}, "workloads[0].labels: invalid value 'x y' of label 'app'"),
        ({"version": 1}, "invalid value 1 of label 'version'"),
        (["app=web"], "workloads[0].labels: expected a mapping"),
    ]:
        spec = {"netns": "a", "namespace": "s", "service_account": "x", "labels": labels}
        with pytest.raises(ConfigError) as info:
            parse_config({"workloads": [spec]})
        assert needle in str(info.value)
