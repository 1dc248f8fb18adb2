"""The proxy's decision core, branch by branch, from tables."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.proxy import decide
from agent.proxy.decide import Reason

OWN = frozenset({15001, 15006, 15008})
ID_A = "spiffe://td/ns/shop/sa/a"
ID_B = "spiffe://td/ns/shop/sa/b"
ID_REMOTE = "spiffe://td/ns/shop/sa/remote"


@dataclass(frozen=True)
class W:
    identity: str
    mode: str
    ips: frozenset[str]
    certified: bool


A = W(ID_A, "permissive", frozenset({"10.0.0.1", "fd00::1"}), True)
A_PLAIN = W(ID_A, "permissive", frozenset({"10.0.0.1"}), False)
B = W(ID_B, "permissive", frozenset({"10.0.0.2"}), True)
B_STRICT = W(ID_B, "strict", frozenset({"10.0.0.2"}), True)
B_STRICT_PLAIN = W(ID_B, "strict", frozenset({"10.0.0.2"}), False)
B_PLAIN = W(ID_B, "permissive", frozenset({"10.0.0.2"}), False)
DIRECTORY = {"10.9.0.1": ID_REMOTE, "10.9.0.2": ""}


def route(source: W, dst: str, port: int = 80, local: W | None = None, egress: str = "passthrough"
          ) -> decide.Route[W]:  # fmt: skip
    served = {ip: w for w in (source, local) if w is not None for ip in w.ips}
    return decide.route_outbound(source, dst, port, local=served, directory=DIRECTORY,
                                 egress=egress, own_ports=OWN)  # fmt: skip


@pytest.mark.parametrize(
    ("case", "source", "dst", "port", "local", "egress", "expected"),
    [
        ("outside the mesh", A, "192.0.2.1", 80, None, "passthrough",
         decide.Passthrough(Reason.OUTSIDE_MESH)),
        ("outside the mesh, egress refused", A, "192.0.2.1", 80, None, "refuse",
         decide.Refuse(Reason.EGRESS_REFUSED)),
        ("mesh destination", A, "10.9.0.1", 80, None, "refuse", decide.Tunnel(ID_REMOTE)),
        ("mesh destination, source uncertified", A_PLAIN, "10.9.0.1", 80, None, "passthrough",
         decide.Passthrough(Reason.SOURCE_UNCERTIFIED)),
        ("mesh destination with an invalid published identity", A, "10.9.0.2", 80, None,
         "passthrough", decide.Refuse(Reason.INVALID_DESTINATION)),
        ("same node, both certified", A, "10.0.0.2", 80, B, "refuse", decide.Local(B, True)),
        ("same node, destination uncertified", A, "10.0.0.2", 80, B_PLAIN, "passthrough",
         decide.Local(B_PLAIN, False)),
        ("same node, strict destination, plaintext source", A_PLAIN, "10.0.0.2", 80, B_STRICT,
         "passthrough", decide.Refuse(Reason.STRICT_PLAINTEXT, at_destination=True)),
        ("same node, strict destination without certificate", A, "10.0.0.2", 80,
         B_STRICT_PLAIN, "passthrough", decide.Refuse(Reason.STRICT_PLAINTEXT, True)),
        ("same node, strict destination, both certified", A, "10.0.0.2", 80, B_STRICT,
         "passthrough", decide.Local(B_STRICT, True)),
        ("the proxy's own outbound listener", A, "127.0.0.1", 15001, None, "passthrough",
         decide.Refuse(Reason.LOOP)),
        ("the proxy's own inbound listener on the pod IP", A, "10.0.0.1", 15006, None,
         "passthrough", decide.Refuse(Reason.LOOP)),
        ("the pod's own IPv6 address, tunnel port", A, "fd00::1", 15008, None, "passthrough",
         decide.Refuse(Reason.LOOP)),
        ("an own port on another host is not a loop", A, "192.0.2.1", 15006, None,
         "passthrough", decide.Passthrough(Reason.OUTSIDE_MESH)),
        ("the pod itself, not an own port", A, "10.0.0.1", 80, None, "passthrough",
         decide.Passthrough(Reason.OUTSIDE_MESH)),
    ],
)  # fmt: skip
def test_route_outbound(
    case: str, source: W, dst: str, port: int, local: W | None, egress: str,
    expected: decide.Route[W],
) -> None:  # fmt: skip
    assert route(source, dst, port, local, egress) == expected, case


@pytest.mark.parametrize(
    ("case", "workload", "dst", "port", "expected"),
    [
        ("permissive", A, "10.0.0.1", 80, decide.Admit(Reason.PERMISSIVE)),
        ("strict", B_STRICT, "10.0.0.2", 80, decide.Deny(Reason.STRICT_PLAINTEXT)),
        ("straight at the inbound listener", A, "10.0.0.1", 15006, decide.Deny(Reason.LOOP)),
        ("straight at the tunnel port", B_STRICT, "10.0.0.2", 15008, decide.Deny(Reason.LOOP)),
        ("loopback outbound port", A, "127.0.0.1", 15001, decide.Deny(Reason.LOOP)),
    ],
)
def test_admit_inbound(case: str, workload: W, dst: str, port: int, expected: object) -> None:
    assert decide.admit_inbound(workload, dst, port, OWN) == expected, case


def test_admit_tunnel_needs_a_certificate() -> None:
    assert decide.admit_tunnel(A) == decide.Admit(Reason.AUTHENTICATED)
    assert decide.admit_tunnel(A_PLAIN) == decide.Deny(Reason.NO_CERTIFICATE)


@pytest.mark.parametrize(
    ("case", "peer", "authority", "expected"),
    [
        ("to the pod", ID_B, "10.0.0.1:8080", decide.AdmitStream("10.0.0.1", 8080)),
        ("to the pod over IPv6", ID_B, "[fd00:0::1]:443", decide.AdmitStream("fd00::1", 443)),
        ("no authenticated peer", "", "10.0.0.1:8080", decide.Deny(Reason.UNKNOWN_PEER, 403)),
        ("a host name", ID_B, "db.shop:5432", decide.Deny(Reason.BAD_AUTHORITY, 400)),
        ("no port", ID_B, "10.0.0.1", decide.Deny(Reason.BAD_AUTHORITY, 400)),
        ("port 0", ID_B, "10.0.0.1:0", decide.Deny(Reason.BAD_AUTHORITY, 400)),
        ("someone else's address", ID_B, "10.0.0.2:8080",
         decide.Deny(Reason.NOT_MY_ADDRESS, 403)),
        ("loopback", ID_B, "127.0.0.1:8080", decide.Deny(Reason.NOT_MY_ADDRESS, 403)),
        ("the proxy's own inbound port", ID_B, "10.0.0.1:15006", decide.Deny(Reason.LOOP, 403)),
    ],
)  # fmt: skip
def test_admit_stream(case: str, peer: str, authority: str, expected: object) -> None:
    assert decide.admit_stream(A, peer, authority, OWN) == expected, case
