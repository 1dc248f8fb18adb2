"""The node agent's side of the CA service: workload certificates by CSR, no key to sign with.

With `identity.ca_url` set (Kubernetes), `CaClient` takes the place of the node's own signer
(`agent.identity.certs.NodeSigner`) behind the same `mint` call, so issuing and renewing at
half-life work as before.  For each certificate it makes a fresh ECDSA P-256 key (which never
leaves this process), a CSR whose only name is the workload's SPIFFE ID, and POSTs it to
`<ca_url>/v1/certificates` with the agent's service-account token (read from
`identity.token_file` at every request, so a rotated projected token just works) and the name of
a pod on this node that runs as that service account (`find_pod`, from the agent's pod watch: the
CA checks that pod's `spec.nodeName`).  The CA service's TLS certificate is verified against the
trust bundle the node already has (`bundle.pem` in the credentials directory, public), with its
host name.  A refusal raises `IdentityError` with the CA's status and reason, so the enrollment
that asked fails (and rolls back) with a message that says why; nothing is retried here (the
renewal loop asks again on its next tick).

The call blocks the caller for one round trip (at most `TIMEOUT` seconds).  The token is sent
only to the CA and never logged.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from agent.identity.ca import key_pem, load_certificates, new_key, read_file
from agent.identity.certs import WorkloadCertificate
from agent.identity.spiffe import IdentityError, spiffe_id

TIMEOUT = 5.0  # seconds; the call blocks the agent (see the module doc)
PodFinder = Callable[[str, str], "tuple[str, str] | None"]  # (namespace, sa) -> a pod on the node


class CaClient:
    def __init__(self, url: str, bundle: Path, token_file: Path, trust_domain: str,
                 find_pod: PodFinder) -> None:  # fmt: skip
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise IdentityError(f"identity.ca_url {url!r} is not an https:// URL")
        self.url = url.rstrip("/")
        self.host, self.port = parts.hostname, parts.port or 443
        self.base = parts.path.rstrip("/")
        self.roots = load_certificates(bundle, "trust bundle")
        self.bundle_pem = read_file(bundle, "trust bundle")
        self.token_file = token_file
        self.trust_domain = trust_domain
        self.find_pod = find_pod
        self.context = ssl.create_default_context(cadata=self.bundle_pem.decode())
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3

    def __repr__(self) -> str:
        return f"CaClient(url={self.url!r}, trust_domain={self.trust_domain!r})"

    @property
    def not_after(self) -> dt.datetime:
        """When the trust bundle's first root expires (no node certificate in this mode)."""
        return min(root.not_valid_after_utc for root in self.roots)

    def mint(self, namespace: str, service_account: str, ttl_seconds: float,
             now: dt.datetime | None = None) -> WorkloadCertificate:  # fmt: skip
        """A certificate for `spiffe://<td>/ns/<namespace>/sa/<sa>` from the CA service."""
        uri = spiffe_id(self.trust_domain, namespace, service_account)
        pod = self.find_pod(namespace, service_account)
        if pod is None:
            raise IdentityError(
                f"no pod of {namespace}/{service_account} on this node is known (yet), so the "
                f"CA service cannot be asked for {uri}"
            )
        key = new_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .sign(key, hashes.SHA256())
        )
        body = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "pod": {"namespace": pod[0], "name": pod[1]},
            "ttl_seconds": ttl_seconds,
        }
        status, answer = self._post(body)
        if status != 200:
            raise IdentityError(
                f"the CA service {self.url} refused {uri} (pod {pod[0]}/{pod[1]}): {status} "
                f"{answer.get('error', '')}"
            )
        try:
            chain_pem = str(answer["certificate_chain"]).encode()
            leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        except (KeyError, AttributeError, ValueError, IndexError) as exc:
            raise IdentityError(f"the CA service {self.url} sent no certificate: {exc}") from None
        if leaf.public_key() != key.public_key():
            raise IdentityError(f"the CA service {self.url} sent a certificate for another key")
        return WorkloadCertificate(
            spiffe_id=uri,
            chain_pem=chain_pem,
            key_pem=key_pem(key),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
        )

    def _post(self, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        token = read_file(self.token_file, "service-account token").decode().strip()
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                 timeout=TIMEOUT)  # fmt: skip
        try:
            connection.request("POST", f"{self.base}/v1/certificates", json.dumps(body),
                               {"Authorization": f"Bearer {token}",
                                "Content-Type": "application/json"})  # fmt: skip
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise IdentityError(f"cannot reach the CA service {self.url}: {exc}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(data)
        except ValueError:
            answer = {"error": data[:200].decode(errors="replace")}
        return response.status, answer if isinstance(answer, dict) else {}
