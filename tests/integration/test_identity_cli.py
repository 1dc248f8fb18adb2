"""`agent ca` end to end: the real CLI in temporary directories, checked with `openssl verify`.

Every command runs as `python -m agent ca ...` in a subprocess, exactly as an operator would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.identity.ca import load_private_key
from agent.identity.certs import NodeSigner

REPO = Path(__file__).resolve().parents[2]


def agent(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "agent", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"agent {args} failed ({result.returncode}): {result.stderr}")
    return result


def openssl_verify(bundle: Path, node_cert: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl CLI is required (Debian package openssl)"
    return subprocess.run(
        [openssl, "verify", "-CAfile", bundle, "-untrusted", node_cert, leaf],
        capture_output=True,
        text=True,
        timeout=60,
    )


def leaf_pem(chain_pem: bytes) -> bytes:
    leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    return leaf.public_bytes(Encoding.PEM)


def test_init_creates_a_ca_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    result = agent("ca", "init", "--ca-dir", ca_dir, "--trust-domain", "mesh.example")
    assert "mesh.example" in result.stdout
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert ca_dir.stat().st_mode & 0o777 == 0o700
    root = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    assert root.subject.rfc4514_string() == "CN=Ferry root CA mesh.example,O=Ferry"
    key_before = (ca_dir / "ca.key").read_bytes()

    again = agent("ca", "init", "--ca-dir", ca_dir, check=False)
    assert again.returncode != 0
    assert "already holds a CA" in again.stderr and str(ca_dir) in again.stderr
    assert (ca_dir / "ca.key").read_bytes() == key_before


def test_init_errors_name_the_bad_value(tmp_path: Path) -> None:
    bad = agent("ca", "init", "--ca-dir", tmp_path / "ca", "--trust-domain", "Bad_TD", check=False)
    assert bad.returncode != 0 and "'Bad_TD'" in bad.stderr
    days = agent("ca", "init", "--ca-dir", tmp_path / "ca2", "--days", "0", check=False)
    assert days.returncode != 0 and "0" in days.stderr
    assert not (tmp_path / "ca").exists()


def test_issue_node_show_and_openssl_verify(tmp_path: Path) -> None:
    ca_dir, node_dir = tmp_path / "ca", tmp_path / "node-a"
    agent("ca", "init", "--ca-dir", ca_dir)
    result = agent("ca", "issue-node", "node-a", "--ca-dir", ca_dir, "--out", node_dir)
    assert "node-a" in result.stdout
    assert (node_dir / "node.key").stat().st_mode & 0o777 == 0o600
    assert (node_dir / "bundle.pem").read_bytes() == (ca_dir / "bundle.pem").read_bytes()

    refused = agent(
        "ca", "issue-node", "node-a", "--ca-dir", ca_dir, "--out", node_dir, check=False
    )
    assert refused.returncode != 0 and "refusing to overwrite" in refused.stderr
    bad = agent(
        "ca", "issue-node", "Node_A", "--ca-dir", ca_dir, "--out", tmp_path / "x", check=False
    )
    assert bad.returncode != 0 and "'Node_A'" in bad.stderr

    shown = agent("ca", "show", node_dir).stdout
    assert "CN=Ferry node node-a,O=Ferry" in shown
    assert "issuer:     CN=Ferry root CA cluster.local,O=Ferry" in shown
    assert "not after:" in shown and "pathlen 0" in shown
    assert "PRIVATE" not in shown
    assert "permits:    URIs in cluster.local" in agent("ca", "show", ca_dir).stdout

    signer = NodeSigner.load(node_dir, "cluster.local")
    cert = signer.mint("shop", "web", 3600)
    leaf_dir = tmp_path / "leaf"
    leaf_dir.mkdir()
    leaf = leaf_dir / "leaf.pem"
    leaf.write_bytes(leaf_pem(cert.chain_pem))
    verified = openssl_verify(node_dir / "bundle.pem", node_dir / "node.crt", leaf)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{leaf}: OK" in verified.stdout

    shown = agent("ca", "show", leaf_dir).stdout
    assert "SANs:       spiffe://cluster.local/ns/shop/sa/web" in shown
    assert "subject:    (empty)" in shown


def test_openssl_refuses_a_forged_trust_domain(tmp_path: Path) -> None:
    """The root's URI name constraint, as enforced by the openssl CLI."""
    ca_dir, node_dir = tmp_path / "ca", tmp_path / "node"
    agent("ca", "init", "--ca-dir", ca_dir)
    agent("ca", "issue-node", "node-a", "--ca-dir", ca_dir, "--out", node_dir)
    honest = NodeSigner.load(node_dir, "cluster.local")
    key = load_private_key(node_dir / "node.key", "node key")
    rogue = NodeSigner(key, honest.cert, honest.roots, "other.local")
    forged = tmp_path / "forged.pem"
    forged.write_bytes(leaf_pem(rogue.mint("shop", "web", 3600).chain_pem))
    verified = openssl_verify(node_dir / "bundle.pem", node_dir / "node.crt", forged)
    assert verified.returncode != 0
    assert "permitted subtree violation" in verified.stdout + verified.stderr


def test_no_name_constraints_option(tmp_path: Path) -> None:
    agent("ca", "init", "--ca-dir", tmp_path / "ca", "--no-name-constraints")
    root = x509.load_pem_x509_certificate((tmp_path / "ca" / "ca.crt").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        root.extensions.get_extension_for_class(x509.NameConstraints)


def test_bundle_merges_roots_for_rotation(tmp_path: Path) -> None:
    old, new = tmp_path / "ca-old", tmp_path / "ca-new"
    agent("ca", "init", "--ca-dir", old)
    agent("ca", "init", "--ca-dir", new)
    agent("ca", "issue-node", "node-a", "--ca-dir", old, "--out", tmp_path / "node-old")
    agent("ca", "issue-node", "node-b", "--ca-dir", new, "--out", tmp_path / "node-new")
    bundle = tmp_path / "bundle.pem"
    result = agent("ca", "bundle", "--out", bundle, old, new, old / "ca.crt")
    assert "2 root(s)" in result.stdout
    roots = x509.load_pem_x509_certificates(bundle.read_bytes())
    assert [r.subject for r in roots] == [
        x509.load_pem_x509_certificate((d / "ca.crt").read_bytes()).subject for d in (old, new)
    ]
    assert len({r.serial_number for r in roots}) == 2
    assert bundle.stat().st_mode & 0o777 == 0o644

    for node in ("node-old", "node-new"):
        node_dir = tmp_path / node
        cert = NodeSigner.load(node_dir, "cluster.local").mint("shop", "web", 3600)
        leaf = tmp_path / f"{node}-leaf.pem"
        leaf.write_bytes(leaf_pem(cert.chain_pem))
        verified = openssl_verify(bundle, node_dir / "node.crt", leaf)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        alone = openssl_verify(tmp_path / "ca-old" / "bundle.pem", node_dir / "node.crt", leaf)
        assert (alone.returncode == 0) == (node == "node-old")

    shown = agent("ca", "show", tmp_path).stdout
    assert "bundle.pem [1/2]" in shown and "bundle.pem [2/2]" in shown


def test_bundle_and_show_errors_name_the_bad_value(tmp_path: Path) -> None:
    agent("ca", "init", "--ca-dir", tmp_path / "ca")
    agent("ca", "issue-node", "node-a", "--ca-dir", tmp_path / "ca", "--out", tmp_path / "node")
    not_root = agent(
        "ca", "bundle", "--out", tmp_path / "b.pem", tmp_path / "node" / "node.crt", check=False
    )
    assert not_root.returncode != 0 and "not a self-signed root CA" in not_root.stderr
    missing = agent("ca", "bundle", "--out", tmp_path / "b.pem", tmp_path / "nope", check=False)
    assert missing.returncode != 0 and str(tmp_path / "nope") in missing.stderr
    assert not (tmp_path / "b.pem").exists()
    (tmp_path / "empty").mkdir()
    empty = agent("ca", "show", tmp_path / "empty", check=False)
    assert empty.returncode != 0 and "no .crt or .pem" in empty.stderr
