"""JWT verifications per second in one process: a fresh token every request vs the same token.

`JwtAuthenticator.authenticate` is what a proxy worker calls for every request that carries a
token.  For each algorithm the bench makes a key and `--tokens` distinct tokens (same claims but
`jti`, so each differs), then, on one core:

- fresh: every call brings a token the authenticator has not seen (cache miss: extraction, the
  compact-form and claim checks, the signature check through `cryptography`);
- cached: the same token every call (extraction and one LRU lookup);
- no token: a request without one (the floor: the header lookups alone);
- and, for comparison, `cryptography`'s own signature check of one token's signing input (what
  any Python verifier pays at least per fresh token).

Each figure is the best of `--repeat` timed passes (least disturbed by other load), as calls
per second and microseconds per call.  No network, no root.

    .venv/bin/python -m bench.jwt_verify [--tokens 2000] [--repeat 5] [--algs RS256,ES256,...]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.policy.jwt import JwtAuthenticator
from agent.policy.jwt_rules import JwtRule

ISSUER = "https://issuer.bench"
NOW = 1_700_000_000.0
ALGS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
CURVES = {"ES256": (ec.SECP256R1, "P-256", 32), "ES384": (ec.SECP384R1, "P-384", 48)}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


Signer = tuple[dict[str, str], Callable[[bytes], bytes], Callable[[bytes], Callable[[], None]]]


def signer(alg: str) -> Signer:
    """A new key for `alg`: its public JWK, a function that signs bytes with it and one that
    signs once and returns a check of that signature by `cryptography` alone."""
    digest = hashes.SHA256()
    if alg in ("RS256", "PS256"):
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = rsa_key.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": b64(numbers.n.to_bytes(256, "big")), "e": "AQAB"}
        scheme: padding.AsymmetricPadding = padding.PKCS1v15()
        if alg == "PS256":
            scheme = padding.PSS(mgf=padding.MGF1(digest), salt_length=32)
        rsa_public = rsa_key.public_key()

        def check_rsa(data: bytes) -> Callable[[], None]:
            signature = rsa_key.sign(data, scheme, digest)
            return lambda: rsa_public.verify(signature, data, scheme, digest)

        return jwk, lambda data: rsa_key.sign(data, scheme, digest), check_rsa
    if alg in CURVES:
        curve, crv, size = CURVES[alg]
        ec_key = ec.generate_private_key(curve())
        point = ec_key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": crv, "x": b64(point.x.to_bytes(size, "big")),
               "y": b64(point.y.to_bytes(size, "big"))}  # fmt: skip
        ecdsa = ec.ECDSA(hashes.SHA384() if alg == "ES384" else digest)

        def sign_ec(data: bytes) -> bytes:
            r, s = decode_dss_signature(ec_key.sign(data, ecdsa))
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")

        ec_public = ec_key.public_key()

        def check_ec(data: bytes) -> Callable[[], None]:
            der = ec_key.sign(data, ecdsa)
            return lambda: ec_public.verify(der, data, ecdsa)

        return jwk, sign_ec, check_ec
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ed_public = ed_key.public_key()
    raw = ed_public.public_bytes_raw()

    def check_ed(data: bytes) -> Callable[[], None]:
        signature = ed_key.sign(data)
        return lambda: ed_public.verify(signature, data)

    return {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}, ed_key.sign, check_ed


def tokens(alg: str, count: int) -> tuple[str, list[str], Callable[[], None]]:
    """The JWKS text, `count` distinct signed tokens for `alg`, and a bare `cryptography`
    signature check (of another signature over the first token's signing input)."""
    jwk, sign, check = signer(alg)
    head = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": "bench"}).encode())
    out = []
    for i in range(count):
        claims = {"iss": ISSUER, "sub": "client", "aud": "api", "scope": "read write",
                  "iat": int(NOW), "exp": int(NOW) + 3600, "jti": str(i)}  # fmt: skip
        signing_input = f"{head}.{b64(json.dumps(claims).encode())}"
        out.append(f"{signing_input}.{b64(sign(signing_input.encode()))}")
    jwks = json.dumps({"keys": [{**jwk, "kid": "bench"}]})
    return jwks, out, check(out[0].rsplit(".", 1)[0].encode())


def best_rate(run: Callable[[], int], repeat: int) -> float:
    """Calls per second of the fastest of `repeat` passes of `run` (which returns its calls)."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        calls = run()
        best = max(best, calls / (time.perf_counter() - start))
    return best


def measure(alg: str, count: int, repeat: int) -> dict[str, float]:
    jwks, signed, check = tokens(alg, count)
    rule = JwtRule(issuer=ISSUER, audiences=("api",), jwks=jwks)
    requests = [{"authorization": f"Bearer {t}", "host": "api"} for t in signed]

    def fresh() -> int:
        authenticator = JwtAuthenticator([rule])  # an empty cache: every token is new to it
        for headers in requests:
            if authenticator.authenticate(headers, "", NOW).status:
                raise SystemExit(f"bench: a {alg} token was rejected")
        return len(requests)

    warm = JwtAuthenticator([rule])
    same = requests[0]

    def cached() -> int:
        for _ in range(len(requests) * 10):
            warm.authenticate(same, "", NOW)
        return len(requests) * 10

    bare = {"host": "api", "user-agent": "bench"}

    def no_token() -> int:
        for _ in range(len(requests) * 10):
            warm.authenticate(bare, "", NOW)
        return len(requests) * 10

    def crypto_only() -> int:
        for _ in requests:
            check()
        return len(requests)

    return {
        "crypto": best_rate(crypto_only, repeat),
        "fresh": best_rate(fresh, repeat),
        "cached": best_rate(cached, repeat),
        "none": best_rate(no_token, repeat),
    }


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| alg | fresh token /s | fresh us/call | cryptography verify alone us | same token /s "
        "| same us/call | no token /s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for alg, r in results.items():
        lines.append(
            f"| {alg} | {r['fresh']:,.0f} | {1e6 / r['fresh']:.1f} | {1e6 / r['crypto']:.1f} "
            f"| {r['cached']:,.0f} | {1e6 / r['cached']:.2f} | {r['none']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=2000, help="distinct tokens (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed passes (default 5)")
    parser.add_argument("--algs", default=",".join(ALGS), help=f"default {','.join(ALGS)}")
    args: Any = parser.parse_args(argv)
    algs = [a for a in args.algs.split(",") if a]
    unknown = sorted(set(algs) - set(ALGS))
    if unknown or args.tokens < 1 or args.repeat < 1:
        parser.error(f"--algs from {','.join(ALGS)} (not {unknown}); --tokens, --repeat >= 1")
    results = {}
    for alg in algs:
        print(f"bench: {alg}: signing {args.tokens} tokens", file=sys.stderr)
        results[alg] = measure(alg, args.tokens, args.repeat)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
