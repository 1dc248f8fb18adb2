"""Why a tunnel's TLS handshake failed, as one of a few reasons (pure).

`TunnelConn` ends a connection whose handshake failed with a text (`fail(reason)`):
`TLS handshake: <the ssl exception>`, `peer identity: <why>`, `peer is <id>, expected <id>`,
or the worker's `connect/handshake timeout`.  An ssl exception's text carries OpenSSL's reason
code in brackets (`[SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE] ...`), and a failed verification
also OpenSSL's verify message (`certificate verify failed: unable to get local issuer
certificate`); `reason_of` maps these to the bounded set `REASONS`, which is what
`ferry_proxy_tls_handshake_failures_total{reason}` takes (docs/telemetry.md):

    timeout           no handshake within the connect timeout
    no_client_cert    the client sent no certificate (server side), or the server said it
                      wanted one (client side: TLS 1.3's certificate_required alert)
    unknown_ca        the peer's certificate does not chain to our trust bundle, or the peer
                      said ours does not chain to its (unknown_ca alert)
    bad_certificate   any other certificate the verification or the peer refused (expired,
                      not yet valid, bad signature, wrong key usage, revoked)
    unknown_identity  verified, but no SPIFFE ID of our trust domain (or no ALPN h2)
    wrong_identity    client side: the server is not the identity the directory names
    protocol_error    anything else the TLS layer refused: not TLS, TLS 1.2, no shared cipher
    peer_closed       the peer closed or reset the connection during the handshake
    shed              refused before the handshake at a bound of `limits:` (counted by the
                      worker where it refuses, never derived from a text)
    other             none of the above
"""

from __future__ import annotations

import re

TIMEOUT = "connect/handshake timeout"
REASONS = (
    "timeout",
    "no_client_cert",
    "unknown_ca",
    "bad_certificate",
    "unknown_identity",
    "wrong_identity",
    "protocol_error",
    "peer_closed",
    "shed",
    "other",
)

_SSL_CODE = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
# OpenSSL verify messages that say the chain does not lead to a root we trust.
_UNTRUSTED_CHAIN = (
    "unable to get local issuer certificate",
    "unable to get issuer certificate",
    "self-signed certificate",  # OpenSSL 3
    "self signed certificate",  # OpenSSL 1.1
    "unable to verify the first certificate",
)
_BY_CODE = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_cert",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "bad_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad_certificate",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "bad_certificate",  # a signature that does not verify
    "UNEXPECTED_EOF_WHILE_READING": "peer_closed",
}
_PEER_CLOSED = (
    "peer closed the connection",
    "Connection reset by peer",
    "Broken pipe",
    "EOF occurred in violation of protocol",
    "TLS/SSL connection has been closed",
)


def reason_of(detail: str) -> str:
    """The `REASONS` entry for the text a tunnel connection failed its handshake with."""
    if detail == TIMEOUT:
        return "timeout"
    if detail.startswith("peer identity: "):
        return "unknown_identity"
    if detail.startswith("peer is ") and ", expected " in detail:
        return "wrong_identity"
    code = _SSL_CODE.search(detail)
    if code is not None:
        if code[1] == "CERTIFICATE_VERIFY_FAILED":
            untrusted = any(message in detail for message in _UNTRUSTED_CHAIN)
            return "unknown_ca" if untrusted else "bad_certificate"
        return _BY_CODE.get(code[1], "protocol_error")
    if any(message in detail for message in _PEER_CLOSED):
        return "peer_closed"
    return "other"
