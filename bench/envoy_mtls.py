"""Envoy doing Ferry's cross-node job: TLS origination at the source, termination at the target.

Two bootstraps (dicts, written as JSON by `bench.envoy.EnvoyProcess`), one per node, both with
their listeners inside pod netns (``socket_address.network_namespace_filepath``), as in
`bench.envoy` and built from its pieces (socket addresses, ``original_dst``, ``tcp_proxy``, the
marked upstream bind):

`source_config` (node A, the client pod)
    Listener ``out-<pod>`` on ``127.0.0.1:15001`` in the client pod netns, with the
    ``original_dst`` listener filter; one filter chain per destination port
    (``filter_chain_match.destination_port``, matched against the restored original destination),
    each a ``tcp_proxy`` to its own cluster ``mtls-<port>``: ``type: STATIC``, one endpoint
    ``<server pod IP>:15008``, upstream sockets bound in the client pod netns with ``SO_MARK``
    set before bind (so the pod's redirection lets them out), and an ``UpstreamTlsContext``: the
    client workload's certificate chain and key, TLS 1.3 only, the peer chain verified against the
    trust bundle and its URI SAN required to be the server's SPIFFE ID, and SNI
    ``port-<port>.<SNI_SUFFIX>``, which is how the destination learns the original port.

`destination_config` (node B, the server pod)
    Listener ``tunnel-in`` on ``0.0.0.0:15008`` in the server pod netns with the
    ``tls_inspector`` listener filter and one filter chain per port, selected by SNI
    (``filter_chain_match.server_names``), each terminating TLS (``DownstreamTlsContext``,
    ``require_client_certificate``, the server's chain and key, TLS 1.3 only, client chains
    verified against the bundle and their URI SAN required to be in the trust domain) and
    ``tcp_proxy``-ing to cluster ``app-<port>``: ``STATIC`` ``<server pod IP>:<port>``, opened
    from inside the server pod netns (marked).

Why SNI and not one TLS port per destination port: plain TCP-over-TLS carries no original port,
and Ferry's redirection (which the bench applies unchanged to both pods) exempts only the tunnel
port 15008 from inbound interception; a second port such as 15009 would be redirected to
15006.  SNI on the one exempt port is the HBONE ``:authority`` in TLS clothing: Envoy pays one
ClientHello peek (``tls_inspector``) per connection, nothing per byte.

Unlike Ferry (an IP_TRANSPARENT socket bound to the client's address), Envoy delivers to the app
from the server pod's own address: the app does not see the client IP.  That is cheaper if
anything, so it does not favour Ferry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.envoy import ORIGINAL_DST_FILTER, socket_address, tcp_proxy, upstream_bind_config

SNI_SUFFIX = "ferry-bench.local"
TUNNEL_PORT = 15008
OUTBOUND_PORT = 15001

_TLS = "envoy.transport_sockets.tls"
_TLS_API = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
_TLS_INSPECTOR = {
    "name": "envoy.filters.listener.tls_inspector",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3."
        "TlsInspector"
    },
}
_TLS13 = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}


@dataclass(frozen=True)
class TlsFiles:
    """A workload's certificate chain and key, and the trust bundle, as files Envoy reads."""

    chain: str
    key: str
    bundle: str


def sni(port: int) -> str:
    """The SNI the source sends for destination port `port`."""
    return f"port-{port}.{SNI_SUFFIX}"


def _common_tls(files: TlsFiles, san: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_params": dict(_TLS13),
        "tls_certificates": [
            {"certificate_chain": {"filename": files.chain}, "private_key": {"filename": files.key}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": files.bundle},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}],
        },
    }


def _static_cluster(
    name: str, ip: str, port: int, netns_path: str, mark: int, connect_timeout: float
) -> dict[str, Any]:
    """A one-endpoint cluster whose upstream sockets live in `netns_path`, marked before bind."""
    endpoint = {"address": {"socket_address": {"address": ip, "port_value": port}}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": f"{connect_timeout}s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
        "upstream_bind_config": upstream_bind_config(netns_path, mark),
    }


def _check_ports(ports: Sequence[int]) -> None:
    if not ports or len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
        raise ValueError(f"ports must be distinct TCP ports: {list(ports)}")


def source_config(
    *,
    pod_name: str,
    netns_path: str,
    server_ip: str,
    server_identity: str,
    ports: Sequence[int],
    tls: TlsFiles,
    mark: int = 0x539,
    outbound_port: int = OUTBOUND_PORT,
    tunnel_port: int = TUNNEL_PORT,
    connect_timeout: float = 5.0,
) -> dict[str, Any]:
    """Node A's bootstrap (no admin section): the client pod's outbound listener, TLS upstreams."""
    _check_ports(ports)
    listener_name = f"out-{pod_name}"
    chains: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for port in ports:
        cluster = f"mtls-{port}"
        chains.append(
            {
                "filter_chain_match": {"destination_port": port},
                "filters": [tcp_proxy(f"out-{port}", cluster)],
            }
        )
        upstream = _static_cluster(
            cluster, server_ip, tunnel_port, netns_path, mark, connect_timeout
        )
        upstream["transport_socket"] = {
            "name": _TLS,
            "typed_config": {
                "@type": f"{_TLS_API}.UpstreamTlsContext",
                "sni": sni(port),
                "common_tls_context": _common_tls(tls, {"exact": server_identity}),
            },
        }
        clusters.append(upstream)
    listener = {
        "name": listener_name,
        "stat_prefix": listener_name,
        "address": socket_address("127.0.0.1", outbound_port, netns_path),
        "listener_filters": [ORIGINAL_DST_FILTER],
        "filter_chains": chains,
    }
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def destination_config(
    *,
    netns_path: str,
    server_ip: str,
    trust_domain: str,
    ports: Sequence[int],
    tls: TlsFiles,
    mark: int = 0x539,
    tunnel_port: int = TUNNEL_PORT,
    connect_timeout: float = 5.0,
) -> dict[str, Any]:
    """Node B's bootstrap (no admin section): the server pod's TLS listener, app upstreams."""
    _check_ports(ports)
    downstream_tls = {
        "name": _TLS,
        "typed_config": {
            "@type": f"{_TLS_API}.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": _common_tls(tls, {"prefix": f"spiffe://{trust_domain}/"}),
        },
    }
    chains: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for port in ports:
        cluster = f"app-{port}"
        chains.append(
            {
                "filter_chain_match": {"server_names": [sni(port)]},
                "transport_socket": downstream_tls,
                "filters": [tcp_proxy(f"in-{port}", cluster)],
            }
        )
        clusters.append(
            _static_cluster(cluster, server_ip, port, netns_path, mark, connect_timeout)
        )
    listener = {
        "name": "tunnel-in",
        "stat_prefix": "tunnel-in",
        "address": socket_address("0.0.0.0", tunnel_port, netns_path),
        "listener_filters": [_TLS_INSPECTOR],
        "filter_chains": chains,
    }
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}
