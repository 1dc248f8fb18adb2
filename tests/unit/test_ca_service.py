"""The CA service's decisions as a table: who gets a workload certificate signed, and why not."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.certificates import Certificates
from agent.config import ConfigError, IdentityConfig, parse_config
from agent.identity.ca import init_ca
from agent.identity.ca_server import CsrError, csr_facts
from agent.identity.ca_service import (
    NODE_NAME_EXTRA,
    POD_NAME_EXTRA,
    Approved,
    CertificateRequest,
    CsrFacts,
    PodFacts,
    Refused,
    RequestError,
    Review,
    caller_node,
    decide,
    parse_request,
    pod_facts,
)
from agent.identity.certs import WorkloadCertificate as Minted
from agent.identity.cli import ca
from agent.identity.spiffe import IdentityError, SpiffeId
from agent.workloads import Workload
from tests.unit.fakes import FakeSigner, Journal

TD = "cluster.local"
AGENT = "system:serviceaccount:ferry-system:ferry-agent"
AGENTS = frozenset({AGENT})
WEB = "spiffe://cluster.local/ns/shop/sa/web"
GOOD_CSR = CsrFacts(signature_valid=True, key_ok=True, uris=(WEB,), other_names=())
AGENT_ON_A = Review(True, AGENT, {NODE_NAME_EXTRA: ("node-a",), POD_NAME_EXTRA: ("ferry-x",)})
WEB_ON_A = PodFacts("shop", "web-1", "node-a", "web")


def csr_pem(uris: tuple[str, ...] = (WEB,), dns: tuple[str, ...] = (), key: object = None) -> bytes:
    signing_key = key or ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    csr = builder.sign(signing_key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.PEM)


def tampered(pem: bytes) -> bytes:
    """The same CSR with one bit of its signature flipped."""
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


CASES = [
    # (case, review, node, csr, pod, expected status or None for approved, reason fragment)
    ("right node", AGENT_ON_A, "node-a", GOOD_CSR, WEB_ON_A, None, ""),
    ("wrong node", AGENT_ON_A, "node-a", GOOD_CSR, PodFacts("shop", "web-1", "node-b", "web"),
     403, "scheduled on node 'node-b', not on the requesting node 'node-a'"),
    ("wrong service account", AGENT_ON_A, "node-a", GOOD_CSR,
     PodFacts("shop", "web-1", "node-a", "admin"), 403, "runs as service account 'admin'"),
    ("wrong namespace", AGENT_ON_A, "node-a", GOOD_CSR,
     PodFacts("bank", "web-1", "node-a", "web"), 403, "not in namespace 'shop'"),
    ("pod not found", AGENT_ON_A, "node-a", GOOD_CSR, None, 403, "pod shop/web-1 not found"),
    ("finished pod", AGENT_ON_A, "node-a", GOOD_CSR,
     PodFacts("shop", "web-1", "node-a", "web", "Succeeded"), 403, "has finished"),
    ("expired token",
     Review(False, error="[invalid bearer token, service account token has expired]"),
     None, GOOD_CSR, WEB_ON_A, 401, "token has expired"),
    ("forged token",
     Review(False, error="[invalid bearer token, square/go-jose: error in cryptographic "
                         "primitive]"),
     None, GOOD_CSR, WEB_ON_A, 401, "not authenticated"),
    ("not the node agent", Review(True, "system:serviceaccount:shop:web",
                                  {NODE_NAME_EXTRA: ("node-a",)}),
     "node-a", GOOD_CSR, WEB_ON_A, 403, "is not a Ferry node agent"),
    ("token bound to no node", Review(True, AGENT), None, GOOD_CSR, WEB_ON_A, 403,
     "bound to no node"),
    ("CSR with extra SANs", AGENT_ON_A, "node-a",
     CsrFacts(True, True, (WEB,), ("DNSName:evil.example",)), WEB_ON_A, 400,
     "exactly one URI SAN"),
    ("CSR with two SPIFFE IDs", AGENT_ON_A, "node-a",
     CsrFacts(True, True, (WEB, "spiffe://cluster.local/ns/shop/sa/db"), ()), WEB_ON_A, 400,
     "exactly one URI SAN"),
    ("CSR signature invalid", AGENT_ON_A, "node-a", CsrFacts(False, True, (WEB,), ()),
     WEB_ON_A, 400, "signature does not verify"),
    ("CSR key not P-256", AGENT_ON_A, "node-a", CsrFacts(True, False, (WEB,), ()), WEB_ON_A,
     400, "not ECDSA P-256"),
    ("another trust domain", AGENT_ON_A, "node-a",
     CsrFacts(True, True, ("spiffe://evil.local/ns/shop/sa/web",), ()), WEB_ON_A, 400,
     "not in this CA's trust domain"),
    ("not a SPIFFE ID", AGENT_ON_A, "node-a",
     CsrFacts(True, True, ("spiffe://cluster.local/ns/shop/sa/web/extra",), ()), WEB_ON_A, 400,
     "invalid SPIFFE ID"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("review", "node", "csr", "pod", "status", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    review: Review,
    node: str | None,
    csr: CsrFacts,
    pod: PodFacts | None,
    status: int | None,
    reason: str,
) -> None:
    verdict = decide(TD, AGENTS, review, node, csr, ("shop", "web-1"), pod)
    if status is None:
        assert verdict == Approved(SpiffeId(TD, "shop", "web"), "node-a")
    else:
        assert isinstance(verdict, Refused)
        assert (verdict.status, reason in verdict.reason) == (status, True), verdict.reason


def test_the_node_comes_from_the_token_claim_else_from_the_agents_own_pod() -> None:
    assert caller_node(AGENT_ON_A, None) == "node-a"
    only_pod = Review(True, AGENT, {POD_NAME_EXTRA: ("ferry-x",)})
    agent_pod = PodFacts("ferry-system", "ferry-x", "node-c", "ferry-agent")
    assert caller_node(only_pod, agent_pod) == "node-c"
    assert caller_node(only_pod, None) is None
    assert caller_node(Review(True, AGENT, {NODE_NAME_EXTRA: ("a", "b")}), None) is None


def test_csr_facts_read_what_a_csr_asks_for() -> None:
    assert csr_facts(csr_pem()) == GOOD_CSR
    extra = csr_facts(csr_pem(dns=("evil.example",)))
    assert extra.uris == (WEB,) and extra.other_names == ("DNSName:evil.example",)
    assert csr_facts(tampered(csr_pem())).signature_valid is False
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert csr_facts(csr_pem(key=rsa_key)).key_ok is False
    with pytest.raises(CsrError, match="not a PEM certificate signing request"):
        csr_facts(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


def test_pod_facts_from_an_api_object() -> None:
    obj = {
        "metadata": {"namespace": "shop", "name": "web-1"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "web"},
        "status": {"phase": "Running"},
    }
    assert pod_facts(obj) == WEB_ON_A
    assert pod_facts({"metadata": {"namespace": "shop", "name": "p"}}) == PodFacts(
        "shop", "p", "", "default", "Pending"
    )


def test_the_agent_config_names_a_bad_ca_url_or_probe_switch() -> None:
    config = parse_config({"identity": {"ca_url": "https://ferry-ca.ferry-system.svc:15012"}})
    assert config.identity.ca_url == "https://ferry-ca.ferry-system.svc:15012"
    assert config.kubernetes.probe_snat is True
    with pytest.raises(ConfigError, match=r"identity\.ca_url: 'http://ca:15012' is not an https"):
        parse_config({"identity": {"ca_url": "http://ca:15012"}})
    with pytest.raises(ConfigError, match=r"kubernetes\.probe_snat: 'yes' is not true or false"):
        parse_config({"kubernetes": {"probe_snat": "yes"}})


class FlakySigner(FakeSigner):
    """A CA service that answers, or (while `down`) refuses like an unreachable one."""

    def __init__(self) -> None:
        super().__init__(Journal())
        self.down = False

    def mint(
        self, namespace: str, service_account: str, ttl_seconds: float, now: dt.datetime
    ) -> Minted:
        if self.down:
            raise IdentityError("cannot reach the CA service https://ferry-ca: refused")
        return super().mint(namespace, service_account, ttl_seconds, now)


def test_a_ca_outage_never_costs_a_proxy_its_snapshot_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer = FlakySigner()
    clock = [100.0]
    certificates = Certificates(IdentityConfig(workload_cert_ttl=3600), tmp_path,
                                loader=lambda _identity, _dir: signer,
                                clock=lambda: clock[0])  # fmt: skip
    certificates.load()
    web = Workload("uid-web", "web", "/run/netns/web", 1, "shop", "web")
    db = Workload("uid-db", "db", "/run/netns/db", 2, "shop", "db")
    now = dt.datetime.now(dt.UTC)
    held = certificates.issue(web, now=now)
    signer.down = True
    assert certificates.issue_or_keep(web) == held  # still valid: the snapshot keeps it
    assert certificates.issue_or_keep(db) is None  # none yet: the snapshot goes without it
    later = now + dt.timedelta(seconds=1900)  # past half of web's lifetime
    assert certificates.due([web, db], later) == [web]  # db: asked again in 2 s
    clock[0] += 2.0
    assert certificates.due([web, db], later) == [web, db]
    assert certificates.renew(web, later) is None and certificates.renew(db, later) is None
    assert certificates.due([web, db], later) == []  # not before the backoff: 2 s, 4 s, ...
    clock[0] += 4.0  # the second failure in a row: 4 s
    assert certificates.due([web, db], later) == [web, db]
    assert certificates.status()["failures"] == {
        "uid-db": "cannot reach the CA service https://ferry-ca: refused",
        "uid-web": "cannot reach the CA service https://ferry-ca: refused",
    }
    assert len([r for r in caplog.records if "no certificate for 'db'" in r.getMessage()]) == 1
    signer.down = False
    renewed = certificates.renew(db, later)
    assert renewed is not None and certificates.due([db], later) == []
    assert "uid-db" not in certificates.status()["failures"]


REQUESTS = [
    (b"not json", "the body is not JSON"),
    (b"[1]", "must be a JSON object, got list"),
    (b'{"pod": {"namespace": "shop", "name": "web-1"}}', "csr must be a PEM"),
    (b'{"csr": "x", "pod": "web-1"}', "pod must be an object"),
    (b'{"csr": "x", "pod": {"namespace": "Shop", "name": "web-1"}}',
     "invalid pod namespace 'Shop'"),
    (b'{"csr": "x", "pod": {"namespace": "shop", "name": "../secrets"}}',
     "invalid pod name '../secrets'"),
    (b'{"csr": "x", "pod": {"namespace": "shop", "name": "w"}, "ttl_seconds": NaN}',
     "ttl_seconds nan must be a positive number"),
    (b'{"csr": "x", "pod": {"namespace": "shop", "name": "w"}, "ttl_seconds": true}',
     "ttl_seconds True must be a positive number"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "reason"), REQUESTS)
def test_a_bad_request_is_named(body: bytes, reason: str) -> None:
    with pytest.raises(RequestError) as refused:
        parse_request(body, 3600)
    assert reason in str(refused.value)


def test_a_request_gets_a_ttl_within_bounds() -> None:
    body = b'{"csr": "PEM", "pod": {"namespace": "shop", "name": "web-1"}, "ttl_seconds": 10}'
    assert parse_request(body, 3600) == CertificateRequest(b"PEM", ("shop", "web-1"), 60.0)
    assert parse_request(body.replace(b"10}", b"9e9}"), 3600).ttl == 3600
    assert parse_request(body.replace(b', "ttl_seconds": 10', b""), 3600).ttl == 3600


def test_agent_ca_serve_refuses_a_missing_root_or_listen_address(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(ca, ["serve", "--ca-dir", str(tmp_path / "none")])
    assert missing.exit_code == 1
    assert f"CA key {tmp_path / 'none' / 'ca.key'} does not exist" in missing.output
    init_ca(tmp_path / "ca", "cluster.local")
    bad = runner.invoke(ca, ["serve", "--ca-dir", str(tmp_path / "ca"), "--listen", "15012"])
    assert bad.exit_code == 1 and "--listen '15012' is not host:port" in bad.output
    other = runner.invoke(ca, ["serve", "--ca-dir", str(tmp_path / "ca"), "--trust-domain", "x.io"])
    assert other.exit_code == 1 and "trust domain 'x.io' is not permitted" in other.output
