"""What the fuzzers found, one test each, with the parser's documented error (see `fuzz`).

JSON and YAML nested deeper than Python's recursion limit (3,000 `[` are enough) made the
decoders raise RecursionError, which no caller expected: a datagram from the agent, a worker
message, the policy the agent pushes, a node's directory file, the enrollment store and the
config file each escaped their parser's error type.  The enrollment store also let a
`workloads` that is not a list and an infinite `netns_inode` through as TypeError and
OverflowError, and a config file that is not UTF-8 as UnicodeDecodeError; and the config was
read by PyYAML's pure-Python loader, which takes seconds over a few thousand unclosed brackets
(now libyaml's, as for policy documents).  The HTTP/1.1 inspector, when a server refused an
upgrade and then sent a malformed response in the same read, returned the requests the client
had sent after the upgrade together with the ProtocolError, and deciding them, as the proxy
does with every RequestHead, raised LocalProtocolError.  The CNI plugin's network config and
the primary CNI's conflist, nested too deeply, escaped as RecursionError too, and a `.conf`
that is Ferry's plugin alone was "chained" into a conflist holding it twice, which the next
install changed again.  A policy file whose YAML alias points at a node around it (`&x` /
`b: *x`: a mapping that holds itself) sent the document check into endless recursion, and
aliases of aliases expanded without bound; both are refused naming the document.  (The path
normalization finding is tested beside `normalize_path`, in tests/unit/test_policy_facts.py.)
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.cni_conflist import ConflistError, plugin_entry, with_plugin
from agent.cni_protocol import DECODING_FAILED, CniError, parse_invocation
from agent.config import ConfigError, load_config
from agent.control.protocol import ProtocolError
from agent.control.protocol import decode as decode_control
from agent.directory import parse_node_file
from agent.policy.documents import MAX_DEPTH, MAX_NODES, parse_text
from agent.proxy.http1 import Http1Inspector, RequestHead
from agent.proxy.http1 import ProtocolError as Http1ProtocolError
from agent.proxy.messages import MessageError
from agent.proxy.messages import decode as decode_worker
from agent.proxy.policy_state import PolicyRejected, PolicyState
from agent.workloads import EnrollmentError, EnrollmentStore, StoreError

DEEP = "[" * 3000


def test_a_control_datagram_nested_too_deeply_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not a JSON message"):
        decode_control(DEEP.encode())


def test_a_worker_message_nested_too_deeply_is_a_message_error() -> None:
    with pytest.raises(MessageError, match="not a JSON message"):
        decode_worker(DEEP.encode())


def test_a_policy_nested_too_deeply_is_rejected() -> None:
    with pytest.raises(PolicyRejected, match="policy version 1 refused"):
        PolicyState("ferry-system", "cluster.local").receive(1, True, '{"documents": ' + DEEP)


def test_a_directory_file_nested_too_deeply_is_refused() -> None:
    with pytest.raises(ValueError, match=r"node-a\.json: not JSON"):
        parse_node_file("node-a.json", DEEP)


@pytest.mark.parametrize(
    "text",
    [
        DEEP,
        '{"version": 2, "workloads": null}',
        '{"version": 2, "workloads": 7}',
        '{"version": 2, "workloads": [{"uid": "u", "name": "n", "netns": "/n", "namespace": "a",'
        ' "service_account": "b", "netns_inode": Infinity}]}',
    ],
)
def test_a_malformed_enrollment_store_is_an_enrollment_error(tmp_path: Path, text: str) -> None:
    store = EnrollmentStore(tmp_path)
    store.path.write_text(text)
    with pytest.raises(EnrollmentError, match=r"enrollments|workloads|workload record"):
        store.load()


def test_an_enrollment_store_whose_workloads_are_not_a_list_names_them(tmp_path: Path) -> None:
    store = EnrollmentStore(tmp_path)
    store.path.write_text('{"version": 2, "workloads": "web"}')
    with pytest.raises(StoreError, match="workloads is 'web', not a list"):
        store.load()


@pytest.mark.parametrize("data", [b"node_name: \xff\n", DEEP.encode(), b"{a: " * 3000])
def test_a_config_file_that_cannot_be_read_is_a_config_error_at_once(
    tmp_path: Path, data: bytes
) -> None:
    """Not UTF-8, or nested too deeply for libyaml (YAMLError) or for Python (RecursionError,
    where PyYAML has no libyaml); the pure-Python loader took 7 s over 3,000 `[`."""
    path = tmp_path / "agent.yaml"
    path.write_bytes(data)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"is not valid YAML|nests collections too deeply"):
        load_config(path)
    assert time.monotonic() - start < 2


def test_a_malformed_response_after_a_refused_upgrade_leaves_nothing_to_decide() -> None:
    inspector = Http1Inspector()
    upgrade = b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    (head,) = inspector.client_data(upgrade + b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")
    assert isinstance(head, RequestHead)
    inspector.allow(head.request_id)
    events = inspector.server_data(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 2 X\r\n\r\n"
    )
    assert not any(isinstance(e, RequestHead) for e in events)
    assert isinstance(events[-1], Http1ProtocolError)


def test_a_cni_config_nested_too_deeply_is_a_decoding_error() -> None:
    invocation = b"CNI_COMMAND=ADD\nCNI_CONTAINERID=c1\nCNI_NETNS=/n\nCNI_IFNAME=eth0\n\n"
    with pytest.raises(CniError, match="the network config is not JSON") as caught:
        parse_invocation(invocation + DEEP.encode())
    assert caught.value.code == DECODING_FAILED


def test_a_conflist_nested_too_deeply_is_refused_naming_the_file() -> None:
    with pytest.raises(ConflistError, match=r"10-net\.conflist: not JSON"):
        with_plugin("10-net.conflist", DEEP.encode(), plugin_entry())


def test_a_conf_that_is_ferry_alone_is_not_chained_into() -> None:
    with pytest.raises(ConflistError, match=r"10-net\.conf: is ferry-cni alone"):
        with_plugin("10-net.conf", b'{"type": "ferry-cni"}', plugin_entry())


BOMB = (
    "".join(  # 10^6 values from six short lines
        f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'x'] * 10)}]\n"
        for prev, name in zip(["", "a", "b", "c", "d"], "abcde", strict=True)
    )
    + "f: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("&x\nb: *x\n", "a collection holds itself"),
        ("kind: AuthorizationPolicy\nspec: &s {rules: [{from: *s}]}\n", "holds itself"),
        (BOMB, f"more than {MAX_NODES} values"),
        ("a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n", "nested deeper"),
    ],
    ids=["self", "nested-self", "alias-bomb", "depth"],
)
def test_a_policy_document_that_cannot_be_a_tree_is_refused_at_once(text: str, reason: str) -> None:
    start = time.monotonic()
    (parsed,) = parse_text(text, "bad.yaml")
    assert parsed.document is None
    assert [(e.file, e.document) for e in parsed.errors] == [("bad.yaml", "document #1")]
    assert reason in parsed.errors[0].reason
    assert time.monotonic() - start < 2
