"""`agent ca`: create a root CA, issue node credentials, merge trust bundles, inspect certificates.

    agent ca init --ca-dir /etc/ferry/ca --trust-domain cluster.local
    agent ca issue-node node-a --ca-dir /etc/ferry/ca --out /etc/ferry/node-a
    agent ca bundle --out bundle.pem /etc/ferry/ca-old /etc/ferry/ca-new
    agent ca show /etc/ferry/node-a

A rotation: `init` a new CA, `bundle` old and new roots into every node's `bundle.pem`, re-issue
node credentials from the new CA, and once no certificate from the old root is in use, bundle the
new root alone.  `show` prints certificates only; it never opens a key file.  Every error is a
single line naming the bad value (click.ClickException).
"""

from __future__ import annotations

import os
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from agent.identity.ca import (
    BUNDLE,
    CA_CERT,
    cert_pem,
    init_ca,
    is_ca,
    is_self_signed_ca,
    issue_node,
    load_certificates,
    permitted_trust_domains,
)
from agent.identity.spiffe import IdentityError

dir_type = click.Path(path_type=Path, file_okay=False)


@click.group()
def ca() -> None:
    """Certificate authority for workload identities (root CA, node credentials, bundles)."""


@ca.command("init")
@click.option("--ca-dir", type=dir_type, required=True, help="Directory for the new CA (0700).")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--days", type=int, default=3650, show_default=True, help="Validity in days.")
@click.option(
    "--name-constraints/--no-name-constraints",
    default=True,
    show_default=True,
    help="Permit only URIs in the trust domain below this root (OpenSSL enforces it; some "
    "verifiers, e.g. cryptography's, refuse such roots).",
)
def init_command(ca_dir: Path, trust_domain: str, days: int, name_constraints: bool) -> None:
    """Create a root CA in CA_DIR (refuses to overwrite an existing one)."""
    try:
        cert = init_ca(ca_dir, trust_domain, days, name_constraints=name_constraints)
    except (IdentityError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"created root CA for {trust_domain} in {ca_dir}: {cert}, {ca_dir / BUNDLE}")


@ca.command("issue-node")
@click.argument("node")
@click.option("--ca-dir", type=dir_type, required=True, help="CA directory (`agent ca init`).")
@click.option("--out", type=dir_type, required=True, help="Directory for the node credentials.")
@click.option("--days", type=int, default=365, show_default=True, help="Validity in days.")
def issue_node_command(node: str, ca_dir: Path, out: Path, days: int) -> None:
    """Issue NODE's signing credentials (node.key, node.crt, bundle.pem) into --out."""
    try:
        cert = issue_node(ca_dir, node, out, days)
    except (IdentityError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"issued node credentials for {node} in {out}: {cert}")


def _roots_from(source: Path) -> list[x509.Certificate]:
    path = source / CA_CERT if source.is_dir() else source
    certs = load_certificates(path, "root certificate")
    for cert in certs:
        if not is_self_signed_ca(cert):
            raise IdentityError(
                f"{path}: {cert.subject.rfc4514_string()!r} is not a self-signed root CA"
            )
    return certs


@ca.command("bundle")
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Bundle file."
)
@click.argument(
    "sources", metavar="CA_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
def bundle_command(out: Path, sources: tuple[Path, ...]) -> None:
    """Write one trust bundle holding the roots of every CA_DIR (or PEM file), deduplicated."""
    roots: dict[bytes, x509.Certificate] = {}
    try:
        for source in sources:
            for cert in _roots_from(source):
                roots.setdefault(cert.fingerprint(hashes.SHA256()), cert)
        data = b"".join(cert_pem(cert) for cert in roots.values())
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except (IdentityError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {len(roots)} root(s) to {out}")


def _describe(cert: x509.Certificate) -> list[str]:
    lines = [
        f"  subject:    {cert.subject.rfc4514_string() or '(empty)'}",
        f"  issuer:     {cert.issuer.rfc4514_string()}",
        f"  not before: {cert.not_valid_before_utc.isoformat()}",
        f"  not after:  {cert.not_valid_after_utc.isoformat()}",
        f"  serial:     {cert.serial_number:x}",
    ]
    if is_ca(cert):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        pathlen = "" if bc.path_length is None else f", pathlen {bc.path_length}"
        lines.append(f"  CA:         yes{pathlen}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        lines.append(f"  SANs:       {', '.join(str(name.value) for name in san)}")
    permitted = permitted_trust_domains(cert)
    if permitted:
        lines.append(f"  permits:    URIs in {', '.join(permitted)}")
    return lines


@ca.command("show")
@click.argument("directory", metavar="DIR", type=dir_type)
def show_command(directory: Path) -> None:
    """Print subject, issuer, validity and SANs of the certificates in DIR (never keys)."""
    if not directory.is_dir():
        raise click.ClickException(f"{directory} is not a directory")
    files = sorted(
        path for path in directory.iterdir() if path.suffix in (".crt", ".pem") and path.is_file()
    )
    if not files:
        raise click.ClickException(f"{directory} holds no .crt or .pem files")
    for path in files:
        try:
            certs = load_certificates(path, "certificate file")
        except IdentityError:
            click.echo(f"{path}: no certificate")
            continue
        for index, cert in enumerate(certs):
            suffix = f" [{index + 1}/{len(certs)}]" if len(certs) > 1 else ""
            click.echo(f"{path}{suffix}")
            for line in _describe(cert):
                click.echo(line)


@ca.command("serve")
@click.option(
    "--ca-dir",
    type=dir_type,
    required=True,
    help="The root CA (ca.key, ca.crt, bundle.pem): the mounted Secret.",
)
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--listen", default="0.0.0.0:15012", show_default=True, help="host:port (HTTPS).")
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    default=(
        "ferry-ca.ferry-system.svc",
        "ferry-ca.ferry-system.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    ),
    show_default=True,
    help="DNS name or IP address in the server certificate (repeatable).",
)
@click.option(
    "--agent-account",
    "agent_accounts",
    multiple=True,
    default=("system:serviceaccount:ferry-system:ferry-agent",),
    show_default=True,
    help="Service account (user name) of the node agents (repeatable).",
)
@click.option("--kubeconfig", default="", help='API server config ("": in-cluster).')
@click.option("--audience", default="", help="Audience the agents' tokens must carry.")
@click.option(
    "--max-ttl",
    type=float,
    default=86400.0,
    show_default=True,
    help="Longest workload certificate, in seconds.",
)
def serve_command(ca_dir: Path, trust_domain: str, listen: str, server_names: tuple[str, ...],
                  agent_accounts: tuple[str, ...], kubeconfig: str, audience: str,
                  max_ttl: float) -> None:  # fmt: skip
    """Sign workload CSRs of node agents for pods on their own node (docs/identity.md)."""
    import logging

    from agent.identity.ca_server import serve  # lightkube: only in the CA service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if max_ttl < 60:
        raise click.ClickException(f"--max-ttl {max_ttl!r} is below 60 seconds")
    try:
        serve(ca_dir, trust_domain, listen, list(server_names), kubeconfig,
              list(agent_accounts), max_ttl, audience)  # fmt: skip
    except (IdentityError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
