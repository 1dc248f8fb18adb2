"""TLS for the tunnel: SSL contexts built from PEM held in memory, and the peer's identity.

`ssl.SSLContext.load_cert_chain` only reads paths, and a workload key must never touch a disk,
so the chain and key are written to an anonymous memory file (`os.memfd_create`) and loaded
through `/proc/self/fd/N`; the memfd is closed right after.  The trust bundle (one or more roots)
goes in as `cadata`.

Both ends: TLS 1.3 only, `CERT_REQUIRED` (mutual TLS), no hostname check and no SNI (HBONE
authenticates SPIFFE IDs, not DNS names), ALPN `h2`.  After the handshake `peer_identity` reads
the verified leaf's SPIFFE ID and refuses one outside our trust domain.

Cipher suites: Python 3.11 cannot choose TLS 1.3 suites, so proxy workers run with OPENSSL_CONF
pointing at `openssl.cnf` next to this module (`worker_environment`, used by the supervisor),
which puts TLS_AES_128_GCM_SHA256 first (as Envoy does); AES-256-GCM and ChaCha20 stay allowed.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from agent.identity.spiffe import SpiffeId
from agent.identity.spiffe import peer_identity as identity_from_peercert

ALPN = "h2"
OPENSSL_CONF = Path(__file__).with_name("openssl.cnf")


class TunnelTLSError(Exception):
    """Credentials are unusable, or a peer failed identity checks."""


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("ferry-workload-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem)
        # A separate memfd for the key: load_cert_chain reads each path from its start.
        kfd = os.memfd_create("ferry-workload-key", os.MFD_CLOEXEC)
        try:
            os.write(kfd, key_pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", f"/proc/self/fd/{kfd}")
        finally:
            os.close(kfd)
    except (ssl.SSLError, OSError) as exc:
        raise TunnelTLSError(f"cannot load the workload certificate and key: {exc}") from None
    finally:
        os.close(fd)


def _context(
    server_side: bool, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise TunnelTLSError(f"cannot load the trust bundle: {exc}") from None
    _load_chain(ctx, chain_pem, key_pem)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def check_bundle(bundle_pem: bytes) -> None:
    """Raise TunnelTLSError unless `bundle_pem` holds at least one usable root certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise TunnelTLSError(f"cannot load the trust bundle: {exc}") from None
    if not ctx.get_ca_certs():
        raise TunnelTLSError("cannot load the trust bundle: it holds no certificate")


def client_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    """Context that originates tunnels with this workload's certificate."""
    return _context(False, chain_pem, key_pem, bundle_pem)


def server_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    """Context that terminates tunnels with this workload's certificate, requiring client certs."""
    return _context(True, chain_pem, key_pem, bundle_pem)


def peer_identity(sock: ssl.SSLSocket | ssl.SSLObject, trust_domain: str) -> SpiffeId:
    """The verified peer's SPIFFE ID; raises TunnelTLSError if absent, foreign, or not h2."""
    if sock.selected_alpn_protocol() != ALPN:
        raise TunnelTLSError(f"peer did not negotiate ALPN {ALPN!r}")
    peercert = sock.getpeercert()  # a dict, filled only for a peer OpenSSL verified
    if not peercert:
        raise TunnelTLSError("peer sent no certificate")
    try:
        return identity_from_peercert(peercert, trust_domain)
    except ValueError as exc:
        raise TunnelTLSError(str(exc)) from None


def worker_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with OPENSSL_CONF set to Ferry's config."""
    env = dict(os.environ if base is None else base)
    env["OPENSSL_CONF"] = str(OPENSSL_CONF)
    return env
