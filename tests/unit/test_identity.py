"""Identity: SPIFFE IDs, the CA, node signers, minted certificates, and real TLS 1.3 handshakes.

The handshakes run Python's `ssl` (OpenSSL) over `socket.socketpair()`: both sides present a
minted workload certificate and verify the other against the trust bundle, as the tunnel does.
"""

from __future__ import annotations

import datetime as dt
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from hypothesis import given
from hypothesis import strategies as st

from agent.identity.ca import init_ca, issue_node, load_private_key, new_key
from agent.identity.certs import NodeSigner, WorkloadCertificate, identity_of, renewal_due
from agent.identity.spiffe import (
    DNS_LABEL,
    DNS_NAME,
    IdentityError,
    SpiffeId,
    parse_spiffe_id,
    peer_identity,
    spiffe_id,
)

TD = "cluster.local"


# --- SPIFFE IDs ------------------------------------------------------------------------------


def test_spiffe_id_formats_the_workload_identity() -> None:
    assert spiffe_id(TD, "shop", "web") == "spiffe://cluster.local/ns/shop/sa/web"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("Cluster.local", "shop", "web"), "'Cluster.local'"),
        (("cluster..local", "shop", "web"), "'cluster..local'"),
        ((TD, "Shop", "web"), "namespace 'Shop'"),
        ((TD, "shop", ""), "service account ''"),
        ((TD, "shop", "a/b"), "'a/b'"),
        ((TD, "-shop", "web"), "'-shop'"),
    ],
)
def test_spiffe_id_refuses_bad_parts(args: tuple[str, str, str], needle: str) -> None:
    with pytest.raises(IdentityError, match=needle):
        spiffe_id(*args)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://cluster.local/ns/shop/sa/web", SpiffeId("cluster.local", "shop", "web")),
        ("spiffe://td/ns/a/sa/b", SpiffeId("td", "a", "b")),
        ("spiffe://x-1.example.org/ns/kube-system/sa/default", None),
    ],
)
def test_parse_accepts_the_canonical_shape(uri: str, expected: SpiffeId | None) -> None:
    parsed = parse_spiffe_id(uri)
    assert parsed.uri == uri
    assert str(parsed) == uri
    if expected is not None:
        assert parsed == expected


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://cluster.local/ns/shop/sa/web", "scheme"),
        ("SPIFFE://cluster.local/ns/shop/sa/web", "lower-case 'spiffe://'"),
        ("spiffe:/cluster.local/ns/shop/sa/web", "scheme"),
        ("spiffe://Cluster.local/ns/shop/sa/web", "lower-case"),
        ("spiffe://cluster.local/ns/Shop/sa/web", "namespace 'Shop' must be lower-case"),
        ("spiffe://cluster.local/ns/shop/sa/Web", "service account 'Web'"),
        ("spiffe://cluster.local/NS/shop/sa/web", "exactly /ns/"),
        ("spiffe://cluster.local/ns/shop/sa/web/extra", "exactly /ns/"),
        ("spiffe://cluster.local/ns/shop", "exactly /ns/"),
        ("spiffe://cluster.local/sa/web/ns/shop", "exactly /ns/"),
        ("spiffe://cluster.local", "exactly /ns/"),
        ("spiffe://cluster.local/", "empty path segment"),
        ("spiffe://cluster.local/ns//sa/web", "empty path segment"),
        ("spiffe://cluster.local/ns/shop/sa/web/", "empty path segment"),
        ("spiffe://cluster.local//ns/shop/sa/web", "empty path segment"),
        ("spiffe:///ns/shop/sa/web", "trust domain is empty"),
        ("spiffe://cluster.local/ns/shop/sa/web?x=1", "query or fragment"),
        ("spiffe://cluster.local/ns/shop/sa/web#frag", "query or fragment"),
        ("spiffe://cluster.local:443/ns/shop/sa/web", "port"),
        ("spiffe://user@cluster.local/ns/shop/sa/web", "user info"),
        ("spiffe://cluster.local/ns/sh%6Fp/sa/web", "percent"),
        ("spiffe://cluster_local/ns/shop/sa/web", "'cluster_local'"),
        ("spiffe://cluster.local/ns/shop/sa/we.b", "'we.b'"),
        ("", "scheme"),
    ],
)
def test_parse_refuses_anything_else_naming_the_value(uri: str, reason: str) -> None:
    with pytest.raises(IdentityError) as info:
        parse_spiffe_id(uri)
    message = str(info.value)
    assert repr(uri) in message
    assert reason in message
    assert isinstance(info.value, ValueError)


labels = st.from_regex(DNS_LABEL, fullmatch=True).filter(lambda s: len(s) <= 63)
domains = st.from_regex(DNS_NAME, fullmatch=True).filter(lambda s: len(s) <= 253)


@given(domains, labels, labels)
def test_format_then_parse_round_trips(trust_domain: str, namespace: str, account: str) -> None:
    uri = spiffe_id(trust_domain, namespace, account)
    assert parse_spiffe_id(uri) == SpiffeId(trust_domain, namespace, account)
    assert parse_spiffe_id(uri).uri == uri


# --- CA and node credentials -----------------------------------------------------------------


@dataclass
class Pki:
    ca_dir: Path
    node_dir: Path
    signer: NodeSigner


def make_pki(
    root: Path, trust_domain: str = TD, name_constraints: bool = True, node_days: int = 365
) -> Pki:
    ca_dir, node_dir = root / "ca", root / "node"
    init_ca(ca_dir, trust_domain, name_constraints=name_constraints)
    issue_node(ca_dir, "node-a", node_dir, valid_days=node_days)
    return Pki(ca_dir, node_dir, NodeSigner.load(node_dir, trust_domain))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "main")


def test_ca_and_node_files_have_the_right_modes(pki: Pki) -> None:
    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(pki.ca_dir) == 0o700
    assert mode(pki.ca_dir / "ca.key") == 0o600
    assert mode(pki.ca_dir / "ca.crt") == 0o644
    assert mode(pki.ca_dir / "bundle.pem") == 0o644
    assert mode(pki.node_dir) == 0o700
    assert mode(pki.node_dir / "node.key") == 0o600
    assert mode(pki.node_dir / "node.crt") == 0o644
    assert (pki.node_dir / "bundle.pem").read_bytes() == (pki.ca_dir / "bundle.pem").read_bytes()


def test_root_and_node_certificates_have_the_documented_shape(pki: Pki) -> None:
    root = x509.load_pem_x509_certificate((pki.ca_dir / "ca.crt").read_bytes())
    node = x509.load_pem_x509_certificate((pki.node_dir / "node.crt").read_bytes())
    assert root.subject.rfc4514_string() == "CN=Ferry root CA cluster.local,O=Ferry"
    assert root.issuer == root.subject
    root_bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_bc.critical and root_bc.value.ca
    root_ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert root_ku.key_cert_sign and root_ku.crl_sign and not root_ku.digital_signature
    nc = root.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    assert node.subject.rfc4514_string() == "CN=Ferry node node-a,O=Ferry"
    assert node.issuer == root.subject
    node_bc = node.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert node_bc.ca and node_bc.path_length == 0
    assert node.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    node.verify_directly_issued_by(root)


def test_init_refuses_to_overwrite_an_existing_ca(pki: Pki) -> None:
    before = (pki.ca_dir / "ca.key").read_bytes()
    with pytest.raises(IdentityError, match="already holds a CA"):
        init_ca(pki.ca_dir, TD)
    assert (pki.ca_dir / "ca.key").read_bytes() == before


def test_issue_node_refuses_to_overwrite_and_bad_names(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        issue_node(pki.ca_dir, "node-a", pki.node_dir)
    for bad in ("Node-A", "node_a", "", "node a", "-node", "a" * 64):
        with pytest.raises(IdentityError, match=re.escape(repr(bad))):
            issue_node(pki.ca_dir, bad, tmp_path / "x")
    with pytest.raises(IdentityError, match="0"):
        issue_node(pki.ca_dir, "node-b", tmp_path / "y", valid_days=0)
    with pytest.raises(IdentityError, match="'UPPER'"):
        init_ca(tmp_path / "z", "UPPER")


def test_node_certificate_never_outlives_the_root(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TD, valid_days=10)
    issue_node(tmp_path / "ca", "node-a", tmp_path / "node", valid_days=365)
    root = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    node = x509.load_pem_x509_certificate((tmp_path / "node" / "node.crt").read_bytes())
    assert node.not_valid_after_utc == root.not_valid_after_utc


# --- NodeSigner.load ---------------------------------------------------------------------------


def test_load_refuses_a_key_readable_by_others(pki: Pki) -> None:
    key = pki.node_dir / "node.key"
    for mode in (0o640, 0o604, 0o700):
        key.chmod(mode)
        with pytest.raises(IdentityError, match=f"mode {mode:04o}.*0600 or stricter"):
            NodeSigner.load(pki.node_dir, TD)
    key.chmod(0o400)
    NodeSigner.load(pki.node_dir, TD)


def test_load_refuses_a_node_cert_outside_the_bundle(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    (pki.node_dir / "bundle.pem").write_bytes((other.ca_dir / "bundle.pem").read_bytes())
    with pytest.raises(IdentityError, match="not signed by any root in"):
        NodeSigner.load(pki.node_dir, TD)


def test_load_refuses_a_node_cert_that_is_not_a_ca(pki: Pki) -> None:
    leaf = pki.signer.mint("shop", "web", 3600)
    (pki.node_dir / "node.crt").chmod(0o644)
    (pki.node_dir / "node.crt").write_bytes(_pem_certs(leaf.chain_pem)[0])
    (pki.node_dir / "node.key").write_bytes(leaf.key_pem)
    with pytest.raises(IdentityError, match="is not a CA"):
        NodeSigner.load(pki.node_dir, TD)


def test_load_refuses_missing_files_and_foreign_trust_domains(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="not permitted by the root CA"):
        NodeSigner.load(pki.node_dir, "other.local")
    with pytest.raises(IdentityError, match=r"node key .*node\.key does not exist"):
        NodeSigner.load(tmp_path / "nowhere", TD)


def test_signer_repr_and_bundle(pki: Pki) -> None:
    assert "PRIVATE" not in repr(pki.signer)
    assert pki.signer.bundle_pem == (pki.ca_dir / "ca.crt").read_bytes()


# --- minting -----------------------------------------------------------------------------------


def _pem_certs(chain_pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----\n"
    return [part + marker for part in chain_pem.split(marker) if part.strip()]


def _leaf(cert: WorkloadCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(cert.chain_pem)[0]


def test_mint_makes_a_spiffe_leaf_chained_to_the_node(pki: Pki) -> None:
    now = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
    signer = make_pki_at(pki, now)
    cert = signer.mint("shop", "web", 3600, now=now)
    leaf, node = x509.load_pem_x509_certificates(cert.chain_pem)
    assert cert.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"
    assert node == signer.cert
    leaf.verify_directly_issued_by(node)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(cert.spiffe_id)]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_before == now - dt.timedelta(seconds=60) == leaf.not_valid_before_utc
    assert cert.not_after == now + dt.timedelta(hours=1) == leaf.not_valid_after_utc
    assert cert.serial == leaf.serial_number
    assert cert.not_before.tzinfo is not None and cert.not_after.tzinfo is not None
    assert b"BEGIN PRIVATE KEY" in cert.key_pem


def make_pki_at(pki: Pki, now: dt.datetime) -> NodeSigner:
    """A signer whose CA and node certificate were made at `now` (for fixed-time tests)."""
    root = pki.ca_dir.parent / f"at-{now:%Y%m%d%H%M%S}"
    init_ca(root / "ca", TD, now=now)
    issue_node(root / "ca", "node-a", root / "node", now=now)
    return NodeSigner.load(root / "node", TD)


def test_every_mint_has_a_fresh_key_and_serial(pki: Pki) -> None:
    first = pki.signer.mint("shop", "web", 3600)
    second = pki.signer.mint("shop", "web", 3600)
    assert first.key_pem != second.key_pem
    assert first.serial != second.serial
    assert _leaf(first).public_key() != _leaf(second).public_key()


def test_mint_never_outlives_the_node_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, node_days=1)
    cert = pki.signer.mint("shop", "web", 7 * 86400)
    assert cert.not_after == pki.signer.not_after
    later = pki.signer.not_after + dt.timedelta(seconds=1)
    with pytest.raises(IdentityError, match="expired"):
        pki.signer.mint("shop", "web", 3600, now=later)


def test_mint_refuses_bad_input_naming_it(pki: Pki) -> None:
    with pytest.raises(IdentityError, match="namespace 'Shop'"):
        pki.signer.mint("Shop", "web", 3600)
    with pytest.raises(IdentityError, match="TTL 0"):
        pki.signer.mint("shop", "web", 0)
    with pytest.raises(IdentityError, match="time zone"):
        pki.signer.mint("shop", "web", 60, now=dt.datetime(2030, 1, 1))


def test_repr_never_shows_the_key(pki: Pki) -> None:
    cert = pki.signer.mint("shop", "web", 3600)
    key_body = cert.key_pem.decode().splitlines()[1]
    for text in (repr(cert), str(cert), f"{cert}", f"{cert!r}"):
        assert "key_pem" not in text
        assert "PRIVATE KEY" not in text
        assert key_body not in text
    assert cert.spiffe_id in repr(cert)


def test_renewal_is_due_at_half_the_lifetime(pki: Pki) -> None:
    cert = pki.signer.mint("shop", "web", 1000)
    lifetime = cert.not_after - cert.not_before
    assert not renewal_due(cert, cert.not_before)
    assert not renewal_due(cert, cert.not_before + lifetime * 0.49)
    assert renewal_due(cert, cert.not_before + lifetime * 0.50)
    assert renewal_due(cert, cert.not_after + dt.timedelta(days=1))


def test_write_gives_the_key_mode_0600(pki: Pki, tmp_path: Path) -> None:
    cert = pki.signer.mint("shop", "web", 3600)
    chain, key = cert.write(tmp_path, "web")
    assert key.stat().st_mode & 0o777 == 0o600
    assert chain.stat().st_mode & 0o777 == 0o644
    assert key.read_bytes() == cert.key_pem and chain.read_bytes() == cert.chain_pem
    renewed = pki.signer.mint("shop", "web", 3600)
    renewed.write(tmp_path, "web")
    assert key.read_bytes() == renewed.key_pem and key.stat().st_mode & 0o777 == 0o600


# --- identity_of -------------------------------------------------------------------------------


def _forge(signer_dir: Path, names: list[x509.GeneralName]) -> bytes:
    """A leaf signed by a node key with arbitrary SANs (what a stolen node key could make)."""
    node_key = load_private_key(signer_dir / "node.key", "node key")
    node = x509.load_pem_x509_certificate((signer_dir / "node.crt").read_bytes())
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "forged")]))
        .issuer_name(node.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(node_key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_identity_of_reads_the_single_uri_san(pki: Pki) -> None:
    cert = pki.signer.mint("shop", "web", 3600)
    der = _leaf(cert).public_bytes(Encoding.DER)
    assert identity_of(der, TD) == SpiffeId(TD, "shop", "web")


@pytest.mark.parametrize(
    ("names", "needle"),
    [
        ([], "no subject alternative name"),
        ([x509.DNSName("web.shop")], "0 URI SANs"),
        (
            [
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/a/sa/b"),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/c/sa/d"),
            ],
            "2 URI SANs",
        ),
        (
            [x509.UniformResourceIdentifier("spiffe://other.local/ns/a/sa/b")],
            "not in trust domain 'cluster.local'",
        ),
        ([x509.UniformResourceIdentifier("https://cluster.local/ns/a/sa/b")], "scheme"),
    ],
)
def test_identity_of_refuses(pki: Pki, names: list[x509.GeneralName], needle: str) -> None:
    with pytest.raises(IdentityError, match=needle):
        identity_of(_forge(pki.node_dir, names), TD)


def test_identity_of_refuses_garbage() -> None:
    with pytest.raises(IdentityError, match="not a DER"):
        identity_of(b"not a certificate", TD)


# --- verification with cryptography's verifier ------------------------------------------------


def _client_verify(roots: list[x509.Certificate], cert: WorkloadCertificate) -> list[str]:
    leaf, *intermediates = x509.load_pem_x509_certificates(cert.chain_pem)
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verified = verifier.verify(leaf, intermediates)
    assert len(verified.chain) == 3  # leaf, node, root
    return [str(name.value) for name in verified.subjects or []]


def test_cryptography_verifier_accepts_a_chain_from_an_unconstrained_root(tmp_path: Path) -> None:
    pki = make_pki(tmp_path, name_constraints=False)
    cert = pki.signer.mint("shop", "web", 3600)
    assert _client_verify(pki.signer.roots, cert) == [cert.spiffe_id]
    other = make_pki(tmp_path / "other", name_constraints=False)
    with pytest.raises(VerificationError):
        _client_verify(other.signer.roots, cert)


def test_cryptography_verifier_refuses_uri_name_constraints(pki: Pki) -> None:
    """Documents the caveat in ca.py: cryptography 50 does not implement URI constraints."""
    cert = pki.signer.mint("shop", "web", 3600)
    with pytest.raises(VerificationError, match="unsupported name constraint"):
        _client_verify(pki.signer.roots, cert)


# --- real TLS 1.3 handshakes -------------------------------------------------------------------


class HandshakeRefused(Exception):
    def __init__(self, server: BaseException | None, client: BaseException | None) -> None:
        super().__init__(f"server: {server!r}; client: {client!r}")
        self.server = server
        self.client = client


def _context(
    server_side: bool, cert: WorkloadCertificate, bundle: bytes, directory: Path
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=bundle.decode())
    directory.mkdir(parents=True, exist_ok=True)
    chain, key = cert.write(directory, "server" if server_side else "client")
    context.load_cert_chain(chain, key)
    return context


def handshake(
    server_cert: WorkloadCertificate,
    client_cert: WorkloadCertificate,
    bundle: bytes,
    directory: Path,
    client_bundle: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Mutual TLS 1.3 over a socketpair; returns (DER the server saw, DER the client saw)."""
    server_ctx = _context(True, server_cert, bundle, directory)
    client_ctx = _context(False, client_cert, client_bundle or bundle, directory)
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)
    seen: dict[str, bytes] = {}
    errors: dict[str, BaseException] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                peer = tls.getpeercert(binary_form=True)
                assert peer is not None
                seen["server"] = peer
                tls.sendall(b"s")
                if tls.recv(1) != b"c":
                    raise ConnectionError("client went away")
        except BaseException as exc:
            errors["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock) as tls:
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            assert tls.version() == "TLSv1.3"
            if tls.recv(1) != b"s":
                raise ConnectionError("server closed the connection")
            tls.sendall(b"c")
            seen["client"] = peer
    except (OSError, ConnectionError) as exc:
        errors["client"] = exc
    finally:
        client_sock.close()
        thread.join(timeout=10)
        server_sock.close()
    if errors:
        raise HandshakeRefused(errors.get("server"), errors.get("client"))
    return seen["server"], seen["client"]


def test_mutual_tls_handshake_and_peer_identities(pki: Pki, tmp_path: Path) -> None:
    server_cert = pki.signer.mint("shop", "web", 3600)
    client_cert = pki.signer.mint("shop", "frontend", 3600)
    server_saw, client_saw = handshake(server_cert, client_cert, pki.signer.bundle_pem, tmp_path)
    assert identity_of(server_saw, TD) == SpiffeId(TD, "shop", "frontend")
    assert identity_of(client_saw, TD) == SpiffeId(TD, "shop", "web")


def test_an_expired_client_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    server_cert = pki.signer.mint("shop", "web", 3600)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = pki.signer.mint("shop", "frontend", 3600, now=past)
    with pytest.raises(HandshakeRefused) as info:
        handshake(server_cert, expired, pki.signer.bundle_pem, tmp_path)
    assert "certificate has expired" in str(info.value.server)


def test_an_expired_server_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    expired = pki.signer.mint("shop", "web", 3600, now=past)
    client_cert = pki.signer.mint("shop", "frontend", 3600)
    with pytest.raises(HandshakeRefused) as info:
        handshake(expired, client_cert, pki.signer.bundle_pem, tmp_path)
    assert "certificate has expired" in str(info.value.client)


def test_a_certificate_from_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "stranger")
    server_cert = pki.signer.mint("shop", "web", 3600)
    foreign = stranger.signer.mint("shop", "frontend", 3600)
    with pytest.raises(HandshakeRefused) as info:
        handshake(server_cert, foreign, pki.signer.bundle_pem, tmp_path / "hs")
    assert "unable to get local issuer certificate" in str(info.value.server)


def test_a_forged_trust_domain_is_refused_by_the_name_constraint(pki: Pki, tmp_path: Path) -> None:
    """A stolen node key cannot mint another trust domain's identity under this root."""
    key = load_private_key(pki.node_dir / "node.key", "node key")
    rogue = NodeSigner(key, pki.signer.cert, pki.signer.roots, "other.local")
    forged = rogue.mint("shop", "frontend", 3600)
    server_cert = pki.signer.mint("shop", "web", 3600)
    with pytest.raises(HandshakeRefused) as info:
        handshake(server_cert, forged, pki.signer.bundle_pem, tmp_path)
    assert "permitted subtree violation" in str(info.value.server)


def test_a_trusted_peer_of_the_wrong_trust_domain_is_refused(pki: Pki, tmp_path: Path) -> None:
    """With both roots trusted the handshake succeeds; identity_of still refuses the peer."""
    other = make_pki(tmp_path / "other", trust_domain="other.local")
    bundle = pki.signer.bundle_pem + other.signer.bundle_pem
    server_cert = pki.signer.mint("shop", "web", 3600)
    foreign = other.signer.mint("shop", "frontend", 3600)
    server_saw, _ = handshake(server_cert, foreign, bundle, tmp_path / "hs")
    with pytest.raises(IdentityError, match=r"not in trust domain 'cluster\.local'"):
        identity_of(server_saw, TD)
    assert identity_of(server_saw, "other.local") == SpiffeId("other.local", "shop", "frontend")


def test_a_bundle_with_two_roots_accepts_certificates_from_both(pki: Pki, tmp_path: Path) -> None:
    """CA rotation: old and new roots of one trust domain are trusted side by side."""
    new = make_pki(tmp_path / "new")
    bundle = pki.signer.bundle_pem + new.signer.bundle_pem
    old_cert = pki.signer.mint("shop", "web", 3600)
    new_cert = new.signer.mint("shop", "frontend", 3600)
    server_saw, client_saw = handshake(old_cert, new_cert, bundle, tmp_path / "a")
    assert identity_of(server_saw, TD).service_account == "frontend"
    assert identity_of(client_saw, TD).service_account == "web"
    server_saw, client_saw = handshake(new_cert, old_cert, bundle, tmp_path / "b")
    assert identity_of(server_saw, TD).service_account == "web"
    with pytest.raises(HandshakeRefused):
        handshake(old_cert, new_cert, pki.signer.bundle_pem, tmp_path / "c")


# --- peer_identity (the workers' cryptography-free reader) -------------------------------------


def _decoded(pem: bytes, tmp_path: Path) -> dict[str, object]:
    """The dictionary `SSLSocket.getpeercert()` returns for this certificate (CPython's own
    decoder, as used for peers)."""
    path = tmp_path / "leaf.pem"
    path.write_bytes(pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
    decode = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
    decoded: dict[str, object] = decode(str(path))
    return decoded


def test_peer_identity_agrees_with_identity_of(pki: Pki, tmp_path: Path) -> None:
    cert = pki.signer.mint("shop", "web", 3600)
    der = x509.load_pem_x509_certificate(cert.chain_pem).public_bytes(Encoding.DER)
    assert peer_identity(_decoded(cert.chain_pem, tmp_path), TD) == identity_of(der, TD)


@pytest.mark.parametrize(
    ("peercert", "needle"),
    [
        ({}, "0 URI SANs"),
        ({"subjectAltName": (("DNS", "web.shop"),)}, "0 URI SANs"),
        (
            {"subjectAltName": (("URI", "spiffe://cluster.local/ns/a/sa/b"),) * 2},
            "2 URI SANs",
        ),
        ({"subjectAltName": (("URI", "spiffe://evil.local/ns/a/sa/b"),)}, "not in trust domain"),
        ({"subjectAltName": (("URI", "https://cluster.local/ns/a/sa/b"),)}, "spiffe"),
    ],
)
def test_peer_identity_refuses(peercert: dict[str, object], needle: str) -> None:
    with pytest.raises(IdentityError, match=needle):
        peer_identity(peercert, TD)
