"""The online side of identity: a node mints short-lived workload certificates itself.

`NodeSigner.load` reads the node's credentials directory (`agent ca issue-node`): `node.key`
(must be mode 0600 or stricter, else refused), `node.crt` (must be a CA certificate, match the
key, and be signed by one of the roots in `bundle.pem`) and `bundle.pem` (one or more self-signed
roots; several during a CA rotation).  If the signing root constrains URI names, the configured
trust domain must be one it permits, so a misconfigured node fails at load, not at handshake.

`NodeSigner.mint` creates a fresh ECDSA P-256 key for every certificate and signs a leaf whose
only name is one URI SAN, the workload's SPIFFE ID (empty subject, so the SAN is critical),
keyUsage digitalSignature, extendedKeyUsage serverAuth+clientAuth, valid from 60 s in the past
(clock skew between nodes) to `now + ttl`, never beyond the node certificate.  The result is a
`WorkloadCertificate` whose `chain_pem` (leaf then node certificate) is what a TLS endpoint sends
and whose `key_pem` is left out of `repr()`, so a logged certificate never carries its key.

`renewal_due` says when to mint the next one: at half the certificate's lifetime, leaving the
other half to absorb a node agent that is slow or briefly down.  `identity_of` turns a verified
peer's DER leaf (`SSLSocket.getpeercert(binary_form=True)`) into its `SpiffeId`, insisting on
exactly one URI SAN in the expected trust domain.  Chain verification itself is the TLS stack's
job (OpenSSL, with `bundle_pem` as the trust store).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.identity.ca import (
    BUNDLE,
    CLOCK_SKEW,
    NODE_CERT,
    NODE_KEY,
    cert_pem,
    is_ca,
    is_self_signed_ca,
    key_pem,
    key_usage,
    load_certificate,
    load_certificates,
    load_private_key,
    new_key,
    permitted_trust_domains,
    write_new_file,
)
from agent.identity.spiffe import (
    IdentityError,
    SpiffeId,
    identity_from_uris,
    spiffe_id,
    validate_trust_domain,
)


@dataclass(frozen=True)
class WorkloadCertificate:
    """A minted workload certificate with its private key (which `repr()` never shows)."""

    spiffe_id: str
    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int

    def write(self, directory: Path, stem: str = "workload") -> tuple[Path, Path]:
        """Write `<stem>.crt` (chain, 0644) and `<stem>.key` (0600) atomically into `directory`.

        For `ssl.SSLContext.load_cert_chain`, which only reads files.  Existing files are
        replaced (renewal); each is written to a temporary name and renamed.
        """
        chain_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        for path, data, mode in (
            (key_path, self.key_pem, 0o600),
            (chain_path, self.chain_pem, 0o644),
        ):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()  # left by a crash
            write_new_file(tmp, data, mode)
            os.replace(tmp, path)
        return chain_path, key_path


def renewal_due(cert: WorkloadCertificate, now: dt.datetime) -> bool:
    """True at or after half of `cert`'s lifetime (not_before to not_after)."""
    return now >= cert.not_before + (cert.not_after - cert.not_before) / 2


class NodeSigner:
    """A node's signing key and certificate, and the trust bundle it belongs to."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        roots: list[x509.Certificate],
        trust_domain: str,
    ) -> None:
        self._key = key
        self.cert = cert
        self.roots = roots
        self.trust_domain = validate_trust_domain(trust_domain)
        self.bundle_pem = b"".join(cert_pem(root) for root in roots)
        self._cert_pem = cert_pem(cert)

    def __repr__(self) -> str:
        return (
            f"NodeSigner(subject={self.cert.subject.rfc4514_string()!r}, "
            f"trust_domain={self.trust_domain!r}, not_after={self.not_after.isoformat()}, "
            f"roots={len(self.roots)})"
        )

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @classmethod
    def load(cls, credentials_dir: Path, trust_domain: str) -> NodeSigner:
        """Load and check `node.key`, `node.crt` and `bundle.pem` from `credentials_dir`."""
        validate_trust_domain(trust_domain)
        key_path, cert_path = credentials_dir / NODE_KEY, credentials_dir / NODE_CERT
        bundle_path = credentials_dir / BUNDLE
        key = load_private_key(key_path, "node key")
        cert = load_certificate(cert_path, "node certificate")
        roots = load_certificates(bundle_path, "trust bundle")
        for root in roots:
            if not is_self_signed_ca(root):
                raise IdentityError(
                    f"trust bundle {bundle_path} holds {root.subject.rfc4514_string()!r}, "
                    "which is not a self-signed CA certificate"
                )
        if cert.public_key() != key.public_key():
            raise IdentityError(f"node certificate {cert_path} does not match the key {key_path}")
        if not is_ca(cert):
            raise IdentityError(
                f"node certificate {cert_path} ({cert.subject.rfc4514_string()!r}) is not a CA "
                "certificate; issue one with `agent ca issue-node`"
            )
        issuer = _issuing_root(cert, roots)
        if issuer is None:
            raise IdentityError(
                f"node certificate {cert_path} (issuer {cert.issuer.rfc4514_string()!r}) is not "
                f"signed by any root in {bundle_path}"
            )
        permitted = permitted_trust_domains(issuer)
        if permitted is not None and trust_domain not in permitted:
            raise IdentityError(
                f"trust domain {trust_domain!r} is not permitted by the root CA "
                f"{issuer.subject.rfc4514_string()!r} (it permits {', '.join(permitted)})"
            )
        return cls(key, cert, roots, trust_domain)

    def mint(
        self,
        namespace: str,
        service_account: str,
        ttl_seconds: float,
        now: dt.datetime | None = None,
    ) -> WorkloadCertificate:
        """A fresh key and leaf certificate for `spiffe://<td>/ns/<namespace>/sa/<sa>`."""
        uri = spiffe_id(self.trust_domain, namespace, service_account)
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not (ttl_seconds > 0)
        ):
            raise IdentityError(f"invalid certificate TTL {ttl_seconds!r}: must be > 0 seconds")
        now = now or dt.datetime.now(dt.UTC)
        if now.tzinfo is None:
            raise IdentityError(f"time {now!r} has no time zone")
        now = now.astimezone(dt.UTC).replace(microsecond=0)
        not_before = now - CLOCK_SKEW
        not_after = min(now + dt.timedelta(seconds=ttl_seconds), self.not_after)
        if not_after <= now:
            raise IdentityError(
                f"node certificate {self.cert.subject.rfc4514_string()!r} expired at "
                f"{self.not_after.isoformat()}; issue new node credentials"
            )
        key = new_key()
        leaf = workload_leaf(
            self._key, self.cert.subject, key.public_key(), uri, not_before, not_after
        )
        serial = leaf.serial_number
        return WorkloadCertificate(
            spiffe_id=uri,
            chain_pem=cert_pem(leaf) + self._cert_pem,
            key_pem=key_pem(key),
            not_before=not_before,
            not_after=not_after,
            serial=serial,
        )


def workload_leaf(
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    uri: str,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """A workload leaf for `public_key`: one critical URI SAN `uri`, empty subject, signed by
    `issuer_key` (a node intermediate here, the root in the CA service)."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _issuing_root(cert: x509.Certificate, roots: list[x509.Certificate]) -> x509.Certificate | None:
    for root in roots:
        if root.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return root
    return None


def identity_of(der_cert: bytes, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID of a (verified) peer leaf certificate, in `trust_domain`, or raise."""
    try:
        cert = x509.load_der_x509_certificate(der_cert)
    except (ValueError, TypeError) as exc:
        raise IdentityError("peer certificate is not a DER X.509 certificate") from exc
    subject = cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise IdentityError(
            f"peer certificate {subject!r} has no subject alternative name (no SPIFFE ID)"
        ) from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return identity_from_uris(uris, trust_domain, f"peer {subject!r}")
