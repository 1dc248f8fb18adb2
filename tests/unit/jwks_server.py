"""A JWKS endpoint for tests: a real HTTP server on loopback, serving what the test sets.

`JwksServer` runs `http.server` in a thread on 127.0.0.1 (a free port); `serve(path, status,
body, delay)` sets what `GET path` answers, `requests` counts the GETs per path.  `jwks(*keys)`
is a JSON Web Key Set of fresh EC P-256 public keys (`ec_key()`), as an identity provider
publishes it, and `token(key, claims)` an ES256 JWT signed with one of them.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    location: str = ""


class JwksServer:
    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.requests: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                answer = server.answers.get(self.path, Answer(404, b"not found"))
                time.sleep(answer.delay)
                self.send_response(answer.status)
                if answer.location:
                    self.send_header("Location", answer.location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # a client that stopped reading
                    self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # `close` waits for every answer (no leaked socket)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="jwks-server")
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, body: str | bytes, status: int = 200, delay: float = 0.0,
              location: str = "") -> None:  # fmt: skip
        data = body.encode() if isinstance(body, str) else body
        self.answers[path] = Answer(status, data, delay, location)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _b64(value: int, size: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwks(*keys: ec.EllipticCurvePrivateKey) -> str:
    """The public JWK Set of `keys` (kids k0, k1, ...)."""
    entries = []
    for i, key in enumerate(keys):
        numbers = key.public_key().public_numbers()
        entries.append(
            {"kty": "EC", "crv": "P-256", "kid": f"k{i}", "alg": "ES256",
             "x": _b64(numbers.x, 32), "y": _b64(numbers.y, 32)}
        )  # fmt: skip
    return json.dumps({"keys": entries})


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any], kid: str = "k0") -> str:
    """An ES256 JWT (RFC 7515 compact form) of `claims`, signed with `key`."""
    header = _segment(json.dumps({"alg": "ES256", "kid": kid, "typ": "JWT"}).encode())
    payload = _segment(json.dumps(claims).encode())
    der = key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{header}.{payload}.{_segment(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
