"""JWKS parsing and the agent's jwksUri refresh decision (agent.policy.jwks)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.policy.jwks import (
    KEYS_LIFETIME,
    MAX_JWKS_BYTES,
    JwksError,
    JwksSource,
    after_fetch,
    parse_jwks,
)
from tests.unit.jwt_vectors import Issuer, b64, vector

RSA = Issuer("RS256").jwk()
EC = Issuer("ES256").jwk()
EC384 = Issuer("ES384").jwk()
EC521 = Issuer("ES512").jwk()
OKP = Issuer("EdDSA").jwk()


def doc(*keys: Any) -> str:
    return json.dumps({"keys": list(keys)})


def test_the_rfc_keys_parse() -> None:
    for name in ("rfc7515_a2_rs256", "rfc7515_a3_es256", "rfc8037_a4_ed25519"):
        (key,) = parse_jwks(json.dumps(vector(name)["jwks"])).keys
        assert key.kid == "" and key.alg == ""
    (rsa,) = parse_jwks(json.dumps(vector("rfc7515_a2_rs256")["jwks"])).keys
    assert rsa.algorithms == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}


@pytest.mark.parametrize(
    ("key", "kty", "crv", "algorithms"),
    [
        (RSA, "RSA", "", {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
        ({**RSA, "alg": "PS384"}, "RSA", "", {"PS384"}),
        (EC, "EC", "P-256", {"ES256"}),
        (EC384, "EC", "P-384", {"ES384"}),
        (EC521, "EC", "P-521", {"ES512"}),
        ({k: v for k, v in EC.items() if k != "crv"}, "EC", "P-256", {"ES256"}),  # Envoy default
        ({**{k: v for k, v in EC384.items() if k != "crv"}, "alg": "ES384"}, "EC", "P-384",
         {"ES384"}),
        (OKP, "OKP", "Ed25519", {"EdDSA"}),
        ({**OKP, "use": "sig", "key_ops": ["verify"], "alg": "EdDSA"}, "OKP", "Ed25519",
         {"EdDSA"}),
    ],
)  # fmt: skip
def test_usable_keys(key: dict[str, str], kty: str, crv: str, algorithms: set[str]) -> None:
    (parsed,) = parse_jwks(doc(key)).keys
    assert (parsed.kty, parsed.crv, parsed.kid) == (kty, crv, "k1")
    assert set(parsed.algorithms) == algorithms


SHORT_RSA = {"kty": "RSA", "n": b64((2**1023 + 1).to_bytes(128, "big")), "e": "AQAB"}


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("RSA", "keys[0]: is not a JSON object but a string"),
        ({"n": "x"}, "keys[0]: [kty] is missing"),
        ({"kty": 1}, "keys[0]: [kty] is not a string but a number"),
        ({"kty": "oct", "k": "c2VjcmV0"}, "symmetric [kty] 'oct' is refused"),
        ({"kty": "XYZ"}, "[kty] 'XYZ' is not supported"),
        ({**RSA, "use": "enc"}, "keys[0] (kid 'k1'): [use] is 'enc', not 'sig'"),
        ({**RSA, "key_ops": ["encrypt"]}, "[key_ops] does not include 'verify'"),
        ({**RSA, "kid": 5}, "keys[0]: [kid] is not a string but a number"),
        ({**RSA, "alg": "RSA-OAEP"}, "[alg] 'RSA-OAEP' does not fit an RSA key"),
        ({**RSA, "alg": "HS256"}, "[alg] 'HS256' does not fit an RSA key"),
        ({k: v for k, v in RSA.items() if k != "n"}, "[n] is missing"),
        ({**RSA, "n": "***"}, "[n] is not base64url or is empty"),
        ({**RSA, "e": b64((17).to_bytes(1, "big"))}, "[e] is 17, not 3 or 65537"),
        (SHORT_RSA, "[n] is a 1024-bit number, not an odd modulus of 2048 to 16384 bits"),
        ({**EC, "alg": "ES384"}, "[alg] 'ES384' does not fit [crv] 'P-256' (needs ES256)"),
        ({**EC, "alg": "RS256"}, "[alg] 'RS256' does not fit an EC key"),
        ({**EC, "crv": "secp256k1"}, "[crv] 'secp256k1' is not supported for an EC key"),
        ({**EC, "y": EC["x"]}, "[x], [y] is not a point on P-256"),
        ({**EC, "x": EC384["x"]}, "[x] or [y] is longer than the 32 bytes of P-256"),
        ({k: v for k, v in EC.items() if k != "y"}, "[y] is missing"),
        ({**OKP, "crv": "X25519"}, "[crv] 'X25519' is not supported for an OKP key"),
        ({k: v for k, v in OKP.items() if k != "crv"}, "[crv] is missing"),
        ({**OKP, "x": b64(b"\0" * 31)}, "[x] is 31 bytes, an Ed25519 key is 32"),
        ({**OKP, "alg": "ES256"}, "[alg] 'ES256' does not fit an OKP key"),
    ],
)
def test_unusable_keys_are_skipped_and_named(key: Any, reason: str) -> None:
    keys = parse_jwks(doc(key, OKP))
    assert [k.kty for k in keys.keys] == ["OKP"]
    (skipped,) = keys.skipped
    assert reason in skipped and skipped.startswith("keys[0]")
    with pytest.raises(JwksError, match="Jwks doesn't have any valid public key: keys"):
        parse_jwks(doc(key))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "Jwks is an invalid JSON"),
        ('{"keys": [NaN]}', "Jwks is an invalid JSON"),
        ("[]", "Jwks is not a JSON object but an array"),
        ("{}", "Jwks does not have [keys] field"),
        ('{"keys": {}}', "[keys] in Jwks is not an array but an object"),
        ('{"keys": []}', "Jwks doesn't have any valid public key: [keys] is empty"),
        (" " * (MAX_JWKS_BYTES + 1), "Jwks is larger than"),
    ],
)
def test_unusable_documents(text: str, reason: str) -> None:
    with pytest.raises(JwksError) as e:
        parse_jwks(text)
    assert str(e.value).startswith(reason)


def test_errors_never_echo_key_material() -> None:
    with pytest.raises(JwksError) as e:
        parse_jwks(doc({**RSA, "e": b64((17).to_bytes(1, "big")), "d": "secret-d"}))
    assert RSA["n"] not in str(e.value) and "secret-d" not in str(e.value)


def test_published_text_is_canonical_and_public_only() -> None:
    private = {**EC, "d": "jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI", "use": "sig"}
    reordered = json.dumps({"keys": [dict(reversed(list(private.items())))], "extra": 1})
    a, b = parse_jwks(doc(private)).to_json(), parse_jwks(reordered).to_json()
    assert a == b and "jpsQ" not in a
    assert json.loads(a) == {"keys": [{k: EC[k] for k in ("kty", "kid", "crv", "x", "y")}]}
    assert parse_jwks(a).keys == parse_jwks(doc(EC)).keys


# --- refreshing jwksUri ---------------------------------------------------------------------------

URI = "https://issuer.example/jwks"
GOOD = doc(EC)
ROTATED = doc(Issuer("ES256", kid="k2", serial=1).jwk())


def test_first_fetch_then_every_20_minutes() -> None:
    source = JwksSource(URI)
    assert source.due(0.0) and source.published == ""
    source = after_fetch(source, 1000.0, body=GOOD)
    assert source.published == parse_jwks(GOOD).to_json()
    assert (source.fetched_at, source.next_fetch_at, source.failures) == (1000.0, 2200.0, 0)
    assert not source.due(2199.0) and source.due(2200.0)
    rotated = after_fetch(source, 2200.0, body=ROTATED)
    assert rotated.published == parse_jwks(ROTATED).to_json() != source.published


def test_failures_keep_the_last_good_keys_and_back_off() -> None:
    source = after_fetch(JwksSource(URI), 0.0, body=GOOD)
    waits = []
    now = 1200.0
    for _ in range(8):
        source = after_fetch(source, now, error="timed out after 5 s")
        waits.append(source.next_fetch_at - now)
        now = source.next_fetch_at
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert source.published == parse_jwks(GOOD).to_json()
    assert (source.failures, source.error) == (8, "timed out after 5 s")
    recovered = after_fetch(source, now, body=GOOD)
    assert (recovered.failures, recovered.error, recovered.next_fetch_at) == (0, "", now + 1200)


def test_a_bad_document_is_a_failure() -> None:
    source = after_fetch(JwksSource(URI), 0.0, body=GOOD)
    broken = after_fetch(source, 1200.0, body="<html>502 Bad Gateway</html>")
    assert broken.published == source.published
    assert broken.failures == 1 and broken.error.startswith("Jwks is an invalid JSON")
    empty = after_fetch(source, 1200.0, body='{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    assert empty.published == source.published and "'oct' is refused" in empty.error


def test_without_any_good_fetch_nothing_is_published() -> None:
    source = after_fetch(JwksSource(URI), 0.0, error="connection refused")
    assert (source.published, source.next_fetch_at, source.error) == (
        "",
        60.0,
        "connection refused",
    )
    assert after_fetch(source, 60.0, body=None).error == "fetch failed"


def test_keys_not_refreshed_for_7_days_are_dropped() -> None:
    source = after_fetch(JwksSource(URI), 0.0, body=GOOD)
    assert after_fetch(source, KEYS_LIFETIME - 1, error="x").published != ""
    assert after_fetch(source, KEYS_LIFETIME, error="x").published == ""
