"""The proxy's decision core: where a connection goes and whether it is admitted (pure).

A worker gathers the facts of a connection (the workload it arrived for, the destination the app
asked for, what this proxy serves, the mesh directory) and asks one of these functions; it then
acts on the answer and never decides inline.  Every answer carries a `Reason`, a short stable
token that the worker counts and that access logs and metrics will show; policy (authorization,
JWT, rate limits) plugs in here as further facts and reasons.

Outbound (`route_outbound`), for a connection the app made and the redirection sent to :15001:

    destination is this proxy's own listener           -> Refuse(LOOP)
    destination is another workload served here        -> Local (same-node path), or
                                                          Refuse(STRICT_PLAINTEXT) when the
                                                          destination is strict and either side
                                                          has no certificate
    destination is in the mesh directory
        with an identity that failed validation        -> Refuse(INVALID_DESTINATION)
        and the source has a certificate               -> Tunnel(expected identity)
        and the source has none                        -> Passthrough(SOURCE_UNCERTIFIED)
    destination is outside the mesh, egress refuse     -> Refuse(EGRESS_REFUSED)
    destination is outside the mesh, egress passthrough-> Passthrough(OUTSIDE_MESH)

Inbound plaintext (`admit_inbound`), for a connection redirected to :15006:

    destination is this proxy's own listener           -> Deny(LOOP)
    workload is strict                                 -> Deny(STRICT_PLAINTEXT)
    otherwise                                          -> Admit(PERMISSIVE)

A tunnel connection arriving on :15008 (`admit_tunnel`) needs a workload certificate to
terminate TLS with (Deny(NO_CERTIFICATE) otherwise).  A tunnel stream (`admit_stream`, one HTTP/2
CONNECT) is admitted only from an authenticated peer, to `ip:port` where ip is one of the
workload's own addresses and port is not one of the proxy's:

    peer identity unknown                              -> Deny(UNKNOWN_PEER, 403)
    authority is not ip:port                           -> Deny(BAD_AUTHORITY, 400)
    ip is not one of the workload's                    -> Deny(NOT_MY_ADDRESS, 403)
    port is one of the proxy's own                     -> Deny(LOOP, 403)
    otherwise                                          -> Admit(AUTHENTICATED), with the target

The functions take anything with the `WorkloadFacts` attributes (the worker's own workload
objects), so asking allocates nothing but the answer; common answers are shared constants.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from agent.tunnel.authority import parse_authority


class Reason(enum.StrEnum):
    """Why a connection went where it went; stable tokens for counters and logs."""

    LOCAL = "local"
    MESH = "mesh"
    OUTSIDE_MESH = "outside_mesh"
    SOURCE_UNCERTIFIED = "source_uncertified"
    EGRESS_REFUSED = "egress_refused"
    STRICT_PLAINTEXT = "strict_plaintext"
    LOOP = "loop"
    PERMISSIVE = "permissive"
    AUTHENTICATED = "authenticated"
    NO_CERTIFICATE = "no_certificate"
    UNKNOWN_PEER = "unknown_peer"
    BAD_AUTHORITY = "bad_authority"
    NOT_MY_ADDRESS = "not_my_address"
    INVALID_DESTINATION = "invalid_destination"
    POLICY_DENIED = "policy_denied"  # an AuthorizationPolicy
    RATE_LIMITED = "rate_limited"  # a RateLimitPolicy
    UNAUTHENTICATED = "unauthenticated"  # an invalid JWT (RequestAuthentication)
    POLICY_REVOKED = "policy_revoked"  # open, and closed: a new policy no longer allows it


class WorkloadFacts(Protocol):
    """What the decisions need to know about a workload this proxy serves."""

    @property
    def identity(self) -> str: ...
    @property
    def mode(self) -> str: ...  # permissive | strict
    @property
    def ips(self) -> frozenset[str]: ...
    @property
    def certified(self) -> bool: ...  # holds a certificate and the trust bundle


W = TypeVar("W", bound=WorkloadFacts)


@dataclass(frozen=True, slots=True)
class Local(Generic[W]):
    """Same node: relay straight into `destination`'s netns; `secure` when both sides hold
    certificates (counted as mutual TLS, as ztunnel's local path)."""

    destination: W
    secure: bool
    reason: Reason = Reason.LOCAL


@dataclass(frozen=True, slots=True)
class Tunnel:
    """HBONE to the destination's proxy, which must present `identity`."""

    identity: str
    reason: Reason = Reason.MESH


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plaintext straight to the destination from the source's netns."""

    reason: Reason


@dataclass(frozen=True, slots=True)
class Refuse:
    """Reset the client.  `at_destination`: the refusal is the destination's (its mode), so it
    is counted on the destination's inbound side."""

    reason: Reason
    at_destination: bool = False


Route = Local[W] | Tunnel | Passthrough | Refuse


@dataclass(frozen=True, slots=True)
class Admit:
    reason: Reason


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the connection (reset) or the stream (answer `status`)."""

    reason: Reason
    status: int = 403


@dataclass(frozen=True, slots=True)
class AdmitStream:
    """A tunnel stream may connect to `ip:port` inside the workload's netns."""

    ip: str
    port: int
    reason: Reason = Reason.AUTHENTICATED


OUTSIDE_MESH = Passthrough(Reason.OUTSIDE_MESH)
SOURCE_UNCERTIFIED = Passthrough(Reason.SOURCE_UNCERTIFIED)
EGRESS_REFUSED = Refuse(Reason.EGRESS_REFUSED)
LOOP = Refuse(Reason.LOOP)
INVALID_DESTINATION = Refuse(Reason.INVALID_DESTINATION)
STRICT_DESTINATION = Refuse(Reason.STRICT_PLAINTEXT, at_destination=True)
ADMIT_PERMISSIVE = Admit(Reason.PERMISSIVE)
ADMIT_TUNNEL = Admit(Reason.AUTHENTICATED)
DENY_LOOP = Deny(Reason.LOOP)
DENY_STRICT = Deny(Reason.STRICT_PLAINTEXT)
DENY_NO_CERTIFICATE = Deny(Reason.NO_CERTIFICATE)
DENY_UNKNOWN_PEER = Deny(Reason.UNKNOWN_PEER, 403)
DENY_BAD_AUTHORITY = Deny(Reason.BAD_AUTHORITY, 400)
DENY_NOT_MY_ADDRESS = Deny(Reason.NOT_MY_ADDRESS, 403)
DENY_STREAM_LOOP = Deny(Reason.LOOP, 403)

EGRESS_MODES = ("passthrough", "refuse")


def app_address(workload: WorkloadFacts, peer_ip: str) -> str:
    """The app's address as an outbound connection shows it.  After an iptables or nftables
    REDIRECT the peer keeps the pod's address; the eBPF backend's connect hook sends the app to
    the listener over loopback, so a loopback peer stands for the workload's own address of that
    family (when it has one), which same-node delivery and policy need."""
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return peer_ip
    if not address.is_loopback:
        return peer_ip
    own = sorted(ip for ip in workload.ips if ipaddress.ip_address(ip).version == address.version)
    return own[0] if own else peer_ip


def is_own_listener(ip: str, port: int, workload: WorkloadFacts, own_ports: frozenset[int]) -> bool:
    """True when ip:port is one of the proxy's listeners inside `workload`'s netns: a client
    that reaches it directly (not through a redirect) would make the proxy connect to itself."""
    if port not in own_ports:
        return False
    if ip in workload.ips:
        return True
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def route_outbound(
    source: W,
    dst_ip: str,
    dst_port: int,
    *,
    local: Mapping[str, W],
    directory: Mapping[str, str],
    egress: str,
    own_ports: frozenset[int],
) -> Route[W]:
    """Where a connection from `source`'s app to dst_ip:dst_port goes (see the module doc)."""
    if is_own_listener(dst_ip, dst_port, source, own_ports):
        return LOOP
    destination = local.get(dst_ip)
    if destination is not None and destination is not source:
        secure = source.certified and destination.certified
        if not secure and destination.mode == "strict":
            return STRICT_DESTINATION
        return Local(destination, secure)
    expected = directory.get(dst_ip)
    if expected is None:
        return EGRESS_REFUSED if egress == "refuse" else OUTSIDE_MESH
    if not expected:  # in the mesh, but its published identity was invalid: fail closed
        return INVALID_DESTINATION
    if source.certified:
        return Tunnel(expected)
    return SOURCE_UNCERTIFIED


def admit_inbound(
    workload: WorkloadFacts, dst_ip: str, dst_port: int, own_ports: frozenset[int]
) -> Admit | Deny:
    """Whether a plaintext connection redirected to the inbound listener reaches the app."""
    if is_own_listener(dst_ip, dst_port, workload, own_ports):
        return DENY_LOOP
    if workload.mode == "strict":
        return DENY_STRICT
    return ADMIT_PERMISSIVE


def admit_tunnel(workload: WorkloadFacts) -> Admit | Deny:
    """Whether a TLS connection on the tunnel listener can be terminated at all."""
    return ADMIT_TUNNEL if workload.certified else DENY_NO_CERTIFICATE


def admit_stream(
    workload: WorkloadFacts, peer_identity: str, authority: str, own_ports: frozenset[int]
) -> AdmitStream | Deny:
    """Whether one CONNECT from an authenticated tunnel peer may reach the app."""
    if not peer_identity:
        return DENY_UNKNOWN_PEER
    try:
        ip, port = parse_authority(authority)
    except ValueError:
        return DENY_BAD_AUTHORITY
    if ip not in workload.ips:
        return DENY_NOT_MY_ADDRESS
    if port in own_ports:
        return DENY_STREAM_LOOP
    return AdmitStream(ip, port)
