"""The offline side of identity: a root CA per trust domain, and node signing credentials.

`init_ca` creates a root CA in its own directory (0700): a fresh ECDSA P-256 key in `ca.key`
(0600), a self-signed certificate in `ca.crt` (CA:TRUE, keyUsage keyCertSign+cRLSign, subject
`O=Ferry, CN=Ferry root CA <trust domain>`) and `bundle.pem`, the trust bundle nodes are given
(initially just this root; `agent ca bundle` concatenates several roots so a CA can be rotated).

The root carries a critical name constraint permitting only the URI host `<trust domain>`, so every
certificate below it can only name `spiffe://<trust domain>/...`: a node key that leaks can mint
identities of its own trust domain but never of another one. OpenSSL (and therefore Python's `ssl`
module and the `openssl` CLI) applies URI constraints to the host part of the URI, which for a
SPIFFE ID is the trust domain; the tests check that a leaf naming another trust domain under this
root is refused by a real TLS handshake and by `openssl verify` (error 47, "permitted subtree
violation"). Other name types are not constrained. Caveat: `cryptography`'s own verifier
(`cryptography.x509.verification`, 50.x) does not implement URI name constraints and refuses
*every* chain under such a root ("unsupported name constraint"); `init_ca(...,
name_constraints=False)` (`agent ca init --no-name-constraints`) makes a root without it for
deployments that need one. Without the constraint, `identity_of` still refuses peers outside the
expected trust domain; what is lost is only the guarantee that, in a bundle mixing trust domains,
one domain's node key cannot mint another domain's identities.

`issue_node` gives one node its signing credentials in an output directory (0700): a fresh key in
`node.key` (0600), an intermediate CA certificate in `node.crt` (CA:TRUE with pathlen 0, keyUsage
keyCertSign, `CN=Ferry node <node>`, never valid beyond the root) and a copy of the CA's
`bundle.pem`.  With those the node agent mints workload certificates itself (`certs.py`); the
root key never leaves the CA directory.

Nothing is ever overwritten: an existing CA or node credential is refused with an error naming
the path.  Key files are created with O_EXCL and mode 0600 before a byte of key is written.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import names
from agent.identity.spiffe import IdentityError, validate_trust_domain

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
BUNDLE = "bundle.pem"
NODE_KEY = "node.key"
NODE_CERT = "node.crt"
CLOCK_SKEW = dt.timedelta(seconds=60)


def key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    """keyUsage with only the named bits set (the others never apply to Ferry's certificates)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def validate_node_name(node_name: str) -> str:
    """Node names are DNS subdomains (like Kubernetes node names); raise `IdentityError` if not."""
    try:
        return names.node_name(node_name)
    except names.InvalidName as exc:
        raise IdentityError(str(exc)) from None


def _days(valid_days: int) -> dt.timedelta:
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise IdentityError(f"invalid validity {valid_days!r}: must be a whole number of days >= 1")
    return dt.timedelta(days=valid_days)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8, unencrypted: protected by file mode and by never leaving the node."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_private_dir(path: Path) -> None:
    """Create `path` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start; refuse if it exists (O_EXCL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError as exc:
        raise IdentityError(f"{path} already exists; refusing to overwrite it") from exc
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits we want (0644 files)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def check_key_mode(path: Path) -> None:
    """Refuse a private key file readable or writable by anyone but its owner."""
    mode = path.stat().st_mode & 0o777
    if mode & ~0o600:
        raise IdentityError(
            f"private key {path} has mode {mode:04o}; it must be 0600 or stricter "
            f"(chmod 600 {path})"
        )


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise IdentityError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_private_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 key after checking its file mode."""
    data = read_file(path, what)
    check_key_mode(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{what} {path} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise IdentityError(f"{what} {path} is not an ECDSA P-256 key")
    return key


def load_certificates(path: Path, what: str) -> list[x509.Certificate]:
    data = read_file(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(f"{what} {path} holds no readable PEM certificate") from exc
    return certs


def load_certificate(path: Path, what: str) -> x509.Certificate:
    certs = load_certificates(path, what)
    if len(certs) != 1:
        raise IdentityError(f"{what} {path} holds {len(certs)} certificates, expected one")
    return certs[0]


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def is_self_signed_ca(cert: x509.Certificate) -> bool:
    if not is_ca(cert) or cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def permitted_trust_domains(root: x509.Certificate) -> list[str] | None:
    """URI hosts a root's name constraints permit, or None when URIs are unconstrained."""
    try:
        constraints = root.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    uris = [
        name.value
        for name in constraints.permitted_subtrees or ()
        if isinstance(name, x509.UniformResourceIdentifier)
    ]
    return uris or None


def _utc(now: dt.datetime | None) -> dt.datetime:
    now = now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        raise IdentityError(f"time {now!r} has no time zone")
    return now.astimezone(dt.UTC).replace(microsecond=0)


def init_ca(
    ca_dir: Path,
    trust_domain: str,
    valid_days: int = 3650,
    *,
    name_constraints: bool = True,
    now: dt.datetime | None = None,
) -> Path:
    """Create a root CA for `trust_domain` in `ca_dir`; return the path of `ca.crt`.

    `name_constraints=False` leaves out the URI name constraint, for verifiers that refuse it.
    """
    validate_trust_domain(trust_domain)
    lifetime = _days(valid_days)
    for name in (CA_KEY, CA_CERT, BUNDLE):
        if (ca_dir / name).exists():
            raise IdentityError(
                f"{ca_dir} already holds a CA ({ca_dir / name} exists); refusing to overwrite "
                "it (use another directory to create a new root)"
            )
    start = _utc(now)
    key = new_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferry"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Ferry root CA {trust_domain}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    if name_constraints:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    cert = builder.sign(key, hashes.SHA256())
    make_private_dir(ca_dir)
    write_new_file(ca_dir / CA_KEY, key_pem(key), 0o600)
    write_new_file(ca_dir / CA_CERT, cert_pem(cert), 0o644)
    write_new_file(ca_dir / BUNDLE, cert_pem(cert), 0o644)
    return ca_dir / CA_CERT


def issue_node(
    ca_dir: Path,
    node_name: str,
    out_dir: Path,
    valid_days: int = 365,
    now: dt.datetime | None = None,
) -> Path:
    """Issue `node_name`'s signing credentials from the CA in `ca_dir` into `out_dir`.

    Returns the path of `node.crt`.  The node key is generated here, in `out_dir`; copy that
    directory to the node (or run this on the node with the CA directory mounted) and point
    `identity.node_credentials` at it.
    """
    validate_node_name(node_name)
    lifetime = _days(valid_days)
    ca_key = load_private_key(ca_dir / CA_KEY, "CA key")
    ca_cert = load_certificate(ca_dir / CA_CERT, "CA certificate")
    bundle = read_file(ca_dir / BUNDLE, "trust bundle")
    if ca_cert.public_key() != ca_key.public_key() or not is_self_signed_ca(ca_cert):
        raise IdentityError(f"{ca_dir / CA_CERT} is not a root CA matching {ca_dir / CA_KEY}")
    start = _utc(now)
    if ca_cert.not_valid_after_utc <= start:
        raise IdentityError(
            f"CA certificate {ca_dir / CA_CERT} expired at {ca_cert.not_valid_after_utc}"
        )
    for name in (NODE_KEY, NODE_CERT, BUNDLE):
        if (out_dir / name).exists():
            raise IdentityError(
                f"{out_dir / name} already exists; refusing to overwrite node credentials "
                "(remove them first, or use another directory)"
            )
    key = new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ferry"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"Ferry node {node_name}"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(min(start + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(key_cert_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    make_private_dir(out_dir)
    write_new_file(out_dir / NODE_KEY, key_pem(key), 0o600)
    write_new_file(out_dir / NODE_CERT, cert_pem(cert), 0o644)
    write_new_file(out_dir / BUNDLE, bundle, 0o644)
    return out_dir / NODE_CERT
