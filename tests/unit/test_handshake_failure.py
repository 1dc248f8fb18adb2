"""Tunnel handshake failure texts map to the bounded reasons of the handshake-failure metric."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner
from agent.tunnel.handshake_failure import REASONS, TIMEOUT, reason_of
from agent.tunnel.tls import client_context, server_context

CASES = [
    (TIMEOUT, "timeout"),
    ("TLS handshake: [SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE] peer did not return a "
     "certificate (_ssl.c:992)", "no_client_cert"),
    ("TLS handshake: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate "
     "required (_ssl.c:992)", "no_client_cert"),
    ("TLS handshake: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
     "local issuer certificate (_ssl.c:992)", "unknown_ca"),
    ("TLS handshake: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
     "certificate (_ssl.c:992)", "unknown_ca"),
    ("TLS handshake: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:992)",
     "unknown_ca"),
    ("TLS handshake: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate "
     "has expired (_ssl.c:992)", "bad_certificate"),
    ("TLS handshake: [SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired",
     "bad_certificate"),
    ("TLS handshake: [SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate",
     "bad_certificate"),
    ("peer identity: peer sent no certificate", "unknown_identity"),
    ("peer identity: peer did not negotiate ALPN 'h2'", "unknown_identity"),
    ("peer is 'spiffe://cluster.local/ns/shop/sa/x', expected "
     "'spiffe://cluster.local/ns/shop/sa/server'", "wrong_identity"),
    ("TLS handshake: [SSL: UNSUPPORTED_PROTOCOL] unsupported protocol (_ssl.c:992)",
     "protocol_error"),
    ("TLS handshake: [SSL: HTTP_REQUEST] http request (_ssl.c:992)", "protocol_error"),
    ("TLS handshake: [SSL: WRONG_VERSION_NUMBER] wrong version number", "protocol_error"),
    ("TLS handshake: [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol",
     "peer_closed"),
    ("TLS handshake: peer closed the connection", "peer_closed"),
    ("TLS handshake: [Errno 104] Connection reset by peer", "peer_closed"),
    ("workload removed", "other"),
]  # fmt: skip


@pytest.mark.parametrize(("detail", "reason"), CASES)
def test_a_failure_text_maps_to_its_reason(detail: str, reason: str) -> None:
    assert reason_of(detail) == reason
    assert reason in REASONS


def handshake_errors(client: ssl.SSLContext, server: ssl.SSLContext) -> dict[str, str]:
    """Run a TLS handshake in memory: the text of each side's failure, as a tunnel reports it."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    sides = {
        "client": (client.wrap_bio(c_in, c_out), c_out, s_in),
        "server": (server.wrap_bio(s_in, s_out, server_side=True), s_out, c_in),
    }
    errors: dict[str, str] = {}
    for _ in range(4):
        for name, (tls, out, peer) in sides.items():
            if name not in errors:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    errors[name] = f"TLS handshake: {exc}"
            peer.write(out.read())
    return errors


def test_what_openssl_says_to_a_client_without_a_certificate_or_from_another_ca(
    tmp_path: Path,
) -> None:
    def signer(name: str) -> NodeSigner:
        init_ca(tmp_path / f"{name}-ca", "cluster.local")
        issue_node(tmp_path / f"{name}-ca", name, tmp_path / name)
        return NodeSigner.load(tmp_path / name, "cluster.local")

    ours, theirs = signer("ours"), signer("theirs")
    bundle = (tmp_path / "ours" / "bundle.pem").read_bytes()
    server_cert = ours.mint("shop", "server", 600)
    server = server_context(server_cert.chain_pem, server_cert.key_pem, bundle)
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    errors = handshake_errors(anonymous, server)
    assert reason_of(errors["server"]) == "no_client_cert", errors

    stranger = theirs.mint("shop", "client", 600)
    errors = handshake_errors(client_context(stranger.chain_pem, stranger.key_pem, bundle), server)
    assert reason_of(errors["server"]) == "unknown_ca", errors
    # A client with a certificate of ours dialing a server of theirs: refused on both sides.
    client_cert = ours.mint("shop", "client", 600)
    impostor = server_context(stranger.chain_pem, stranger.key_pem, bundle)
    errors = handshake_errors(
        client_context(client_cert.chain_pem, client_cert.key_pem, bundle), impostor
    )
    assert reason_of(errors["client"]) == "unknown_ca", errors
    assert reason_of(errors["server"]) == "unknown_ca", errors  # the client's alert
