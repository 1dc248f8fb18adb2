"""`agent ca serve`: the CA service, an HTTPS endpoint that signs workload CSRs for node agents.

In Kubernetes the root CA's key lives only in a Secret that this Deployment mounts (`--ca-dir`:
`ca.key`, `ca.crt`, `bundle.pem`, as `agent ca init` writes them); node agents hold no signing
key and ask here instead (`identity.ca_url`, `agent.identity.ca_client`).

One request, `POST /v1/certificates` with `Authorization: Bearer <the agent's service-account
token>` and a JSON body `{"csr": "<PEM>", "pod": {"namespace": ..., "name": ...},
"ttl_seconds": N}`:

1. the CSR is read (`csr_facts`: whether its self-signature verifies, its key type, every name
   it asks for; unreadable: 400);
2. the token is reviewed by the API server (`TokenReview`, authentication.k8s.io/v1; with
   `--audience`, the token must be issued for it); if its node is not in the review's extra, the
   agent's own pod is fetched for its `spec.nodeName`;
3. the named pod is fetched (`GET`; 404 is "not found", not an error);
4. `ca_service.decide` answers; an approval is signed by the root: the CSR's key, the SPIFFE ID
   as its only name, `min(ttl_seconds, --max-ttl)` and never beyond the root.

The answer is `200 {"certificate_chain": PEM, "bundle": PEM, "not_after": epoch}` or
`{"error": reason}` with 400, 401, 403 (as decided), 413 (body over 64 KiB) or 503 (the API
server did not answer: retried by the agent, never taken as a yes).  Every decision is logged
with the caller's service account, node, identity and verdict; tokens and keys never are.
`GET /healthz` answers 200 for the Deployment's probes.

TLS: the server's certificate is minted from the same root at start (names from `--server-name`,
DNS names or IP addresses), lives 7 days and is minted again at half of that; agents verify it
against the trust bundle they already have.  The TLS handshake runs in the connection's own
thread (ThreadingHTTPServer), so a slow client holds up no other.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import signal
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from lightkube import ApiError, Client, KubeConfig
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.models.authentication_v1 import TokenReviewSpec
from lightkube.resources.authentication_v1 import TokenReview

from agent.identity import ca_service
from agent.identity.ca import (
    BUNDLE,
    CA_CERT,
    CA_KEY,
    CLOCK_SKEW,
    cert_pem,
    is_self_signed_ca,
    key_pem,
    key_usage,
    load_certificate,
    load_private_key,
    new_key,
    permitted_trust_domains,
    read_file,
    write_new_file,
)
from agent.identity.certs import workload_leaf
from agent.identity.spiffe import IdentityError, SpiffeId, validate_trust_domain
from agent.kube.client import Pods

log = logging.getLogger("ferry.ca")

PATH = "/v1/certificates"
MAX_BODY = 64 * 1024
SERVER_CERT_LIFETIME = dt.timedelta(days=7)


class Root:
    """The root CA read from the mounted Secret; signs workload leaves and the server's cert."""

    def __init__(self, ca_dir: Path, trust_domain: str) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        self._key = load_private_key(ca_dir / CA_KEY, "CA key")
        self.cert = load_certificate(ca_dir / CA_CERT, "CA certificate")
        self.bundle_pem = read_file(ca_dir / BUNDLE, "trust bundle")
        if self.cert.public_key() != self._key.public_key() or not is_self_signed_ca(self.cert):
            raise IdentityError(f"{ca_dir / CA_CERT} is not a root CA matching {ca_dir / CA_KEY}")
        permitted = permitted_trust_domains(self.cert)
        if permitted is not None and trust_domain not in permitted:
            raise IdentityError(
                f"trust domain {trust_domain!r} is not permitted by the root CA in {ca_dir} "
                f"(it permits {', '.join(permitted)})"
            )

    def __repr__(self) -> str:
        return f"Root(subject={self.cert.subject.rfc4514_string()!r})"

    def sign(self, csr_pem: bytes, identity: SpiffeId, ttl: float) -> tuple[bytes, dt.datetime]:
        """The leaf for the CSR's key naming `identity` (decided already), and its expiry."""
        key = x509.load_pem_x509_csr(csr_pem).public_key()
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        not_after = min(now + dt.timedelta(seconds=ttl), self.cert.not_valid_after_utc)
        leaf = workload_leaf(self._key, self.cert.subject, key, identity.uri,  # type: ignore[arg-type]
                             now - CLOCK_SKEW, not_after)  # fmt: skip
        return cert_pem(leaf), not_after

    def server_credentials(self, names: list[str], folder: Path) -> tuple[Path, Path, dt.datetime]:
        """A fresh server key and certificate for `names`, written into `folder` (0700)."""
        key = new_key()
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        not_after = min(now + SERVER_CERT_LIFETIME, self.cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(digital_signature=True), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        stamp = now.strftime("%Y%m%dT%H%M%S")
        chain, private = folder / f"server-{stamp}.crt", folder / f"server-{stamp}.key"
        for path in (chain, private):
            path.unlink(missing_ok=True)
        write_new_file(private, key_pem(key), 0o600)
        write_new_file(chain, cert_pem(cert), 0o644)
        return chain, private, not_after


class CsrError(ValueError):
    """The request body's CSR is not a PEM certificate signing request."""


def csr_facts(pem: bytes) -> ca_service.CsrFacts:
    """The facts of a PEM CSR; raises `CsrError` if it is not one."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CsrError(f"the CSR is not a PEM certificate signing request: {exc}") from None
    key = csr.public_key()
    uris: list[str] = []
    others: list[str] = []
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    for name in san:
        if isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        else:
            others.append(f"{type(name).__name__}:{name.value}")
    others += [f"subject:{attribute.rfc4514_string()}" for attribute in csr.subject]
    return ca_service.CsrFacts(
        signature_valid=csr.is_signature_valid,
        key_ok=isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1),
        uris=tuple(uris),
        other_names=tuple(others),
    )


class ApiUnavailable(Exception):
    """The API server did not answer a review or a GET: the request is answered 503."""


class Cluster:
    """The two API calls the CA makes: TokenReview and GET pod (lightkube's sync client)."""

    def __init__(self, kubeconfig: str, audience: str = "") -> None:
        try:
            config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
            self.client = Client(config, trust_env=False, timeout=httpx2.Timeout(5.0))
        except (LightkubeConfigError, OSError, KeyError, ValueError) as exc:
            where = kubeconfig or "in-cluster service account, $KUBECONFIG or ~/.kube/config"
            raise IdentityError(f"cannot load the API server config ({where}): {exc}") from None
        self.audiences = [audience] if audience else None

    def review(self, token: str) -> ca_service.Review:
        spec = TokenReviewSpec(token=token, audiences=self.audiences)
        try:
            answer = self.client.create(TokenReview(spec=spec))
        except (ApiError, httpx2.HTTPError) as exc:
            raise ApiUnavailable(f"TokenReview failed: {_why(exc)}") from None
        status = answer.status
        if status is None or not status.authenticated:
            return ca_service.Review(False, error=(status.error if status else None) or "")
        user = status.user
        extra = {k: tuple(v) for k, v in ((user.extra if user else None) or {}).items()}
        return ca_service.Review(True, (user.username if user else None) or "", extra)

    def pod(self, namespace: str, name: str) -> ca_service.PodFacts | None:
        try:
            found: Any = self.client.get(Pods, name, namespace=namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                return None
            raise ApiUnavailable(f"GET pod {namespace}/{name} failed: {_why(exc)}") from None
        except httpx2.HTTPError as exc:
            raise ApiUnavailable(f"GET pod {namespace}/{name} failed: {_why(exc)}") from None
        return ca_service.pod_facts(found.to_dict())


def _why(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{exc.status.code} {exc.status.reason}: {exc.status.message}"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Settings:
    trust_domain: str
    agent_accounts: frozenset[str]
    max_ttl: float


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


def handle(settings: Settings, root: Root, cluster: Cluster, token: str, body: bytes) -> Answer:
    """One certificate request, decided and (if approved) signed."""
    try:
        request = ca_service.parse_request(body, settings.max_ttl)
        csr = csr_facts(request.csr_pem)
    except ValueError as exc:  # RequestError, CsrError
        return Answer(400, {"error": f"bad request: {exc}"})
    pod_ref = request.pod_ref
    try:
        review = cluster.review(token)
        agent_pod = None
        agent_pod_name = ca_service.agent_pod_name(review)
        if ca_service.NODE_NAME_EXTRA not in review.extra and agent_pod_name and review.username:
            agent_namespace = (
                review.username.split(":")[2] if review.username.count(":") == 3 else ""
            )
            agent_pod = cluster.pod(agent_namespace, agent_pod_name)
        node = ca_service.caller_node(review, agent_pod)
        pod = cluster.pod(*pod_ref) if review.authenticated else None
    except ApiUnavailable as exc:
        log.error("refused a certificate request for pod %s/%s: %s", *pod_ref, exc)
        return Answer(503, {"error": f"the API server did not answer: {exc}"})
    verdict = ca_service.decide(
        settings.trust_domain, settings.agent_accounts, review, node, csr, pod_ref, pod
    )
    if isinstance(verdict, ca_service.Refused):
        log.warning("refused %s (node %s) a certificate for pod %s/%s: %d %s",
                    review.username or "an unauthenticated caller", node, *pod_ref,
                    verdict.status, verdict.reason)  # fmt: skip
        return Answer(verdict.status, {"error": verdict.reason})
    chain, not_after = root.sign(request.csr_pem, verdict.identity, request.ttl)
    log.info("signed %s for %s on node %s (pod %s/%s), expires %s", verdict.identity,
             review.username, node, *pod_ref, not_after.isoformat())  # fmt: skip
    return Answer(200, {"certificate_chain": chain.decode(), "bundle": root.bundle_pem.decode(),
                        "not_after": not_after.timestamp()})  # fmt: skip


class CaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: tuple[str, int], settings: Settings, root: Root,
                 cluster: Cluster, server_names: list[str]) -> None:  # fmt: skip
        self.settings, self.root, self.cluster = settings, root, cluster
        self.server_names = server_names
        self._folder = tempfile.TemporaryDirectory(prefix="ferry-ca-")
        self._lock = threading.Lock()
        self._context, self._renew_at = self._fresh_context()
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self.address_family = family
        super().__init__(listen, _Handler)

    def _fresh_context(self) -> tuple[ssl.SSLContext, dt.datetime]:
        chain, key, not_after = self.root.server_credentials(self.server_names,
                                                             Path(self._folder.name))  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(chain, key)
        chain.unlink()
        key.unlink()
        now = dt.datetime.now(dt.UTC)
        return context, now + (not_after - now) / 2

    def context(self) -> ssl.SSLContext:
        with self._lock:
            if dt.datetime.now(dt.UTC) >= self._renew_at:
                self._context, self._renew_at = self._fresh_context()
            return self._context

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10.0)
        try:
            tls = self.context().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # a client that failed its handshake: nothing to answer
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("CA request from %s failed", client_address)

    def server_close(self) -> None:
        super().server_close()
        self._folder.cleanup()


class _Handler(BaseHTTPRequestHandler):
    server: CaServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # decisions are logged by `handle`, without the Authorization header

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": f"no such path {self.path!r}"})

    def do_POST(self) -> None:
        if self.path != PATH:
            self._send(404, {"error": f"no such path {self.path!r}; POST {PATH}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._send(413, {"error": f"request body of {length} bytes is over {MAX_BODY}"})
            return
        body = self.rfile.read(length)
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        if scheme != "Bearer" or not token:
            self._send(401, {"error": "no bearer token (Authorization: Bearer <token>)"})
            return
        server = self.server
        answer = handle(server.settings, server.root, server.cluster, token.strip(), body)
        self._send(answer.status, answer.body)


def serve(ca_dir: Path, trust_domain: str, listen: str, server_names: list[str],
          kubeconfig: str, agent_accounts: list[str], max_ttl: float,
          audience: str = "") -> None:  # fmt: skip
    """Run the CA service until SIGTERM/SIGINT (raises `IdentityError` on bad settings)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise IdentityError(f"--listen {listen!r} is not host:port")
    root = Root(ca_dir, trust_domain)
    settings = Settings(trust_domain, frozenset(agent_accounts), max_ttl)
    server = CaServer((host.strip("[]"), int(port)), settings, root,
                      Cluster(kubeconfig, audience), server_names)  # fmt: skip
    log.info("CA service for %s on https://%s (server names %s), signing for %s",
             trust_domain, listen, ", ".join(server_names), ", ".join(agent_accounts))  # fmt: skip

    def stop(*_: object) -> None:  # shutdown() waits for serve_forever(), whose thread this is
        threading.Thread(target=server.shutdown, name="ca-shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    log.info("CA service stopped")
