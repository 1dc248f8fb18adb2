"""JWT authentication (agent.policy.jwt): RFC vectors, own keys, Envoy's checks and texts."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from agent.policy import jwt_tokens
from agent.policy.jwt import JwtAuthenticator, JwtOutcome, is_cors_preflight, www_authenticate
from agent.policy.jwt_rules import ClaimToHeader, JwtRule, TokenHeader
from agent.policy.jwt_tokens import Reason
from tests.unit.jwt_vectors import Issuer, b64, hs256, segment, vector

NOW = 1_700_000_000.0
ISS = "https://issuer.example"
RS = Issuer("RS256")
ES = Issuer("ES256")


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "alice", "iat": NOW - 10, "exp": NOW + 3600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def rule(issuer: str = ISS, *, keys: Issuer | str = RS, **fields: Any) -> JwtRule:
    jwks = keys if isinstance(keys, str) else keys.jwks()
    return JwtRule(issuer=issuer, jwks=jwks, **fields)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def check(token: str, *rules: JwtRule, now: float = NOW, **kw: Any) -> JwtOutcome:
    authenticator = JwtAuthenticator(rules or (rule(),), **kw)
    return authenticator.authenticate(bearer(token), "", now)


def rejected(outcome: JwtOutcome, reason: Reason, status: int = 401) -> bool:
    return (outcome.status, outcome.reason, outcome.facts) == (status, reason, None)


# --- published vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rfc7515_a2_rs256", "rfc7515_a3_es256"])
def test_rfc_7515_examples_verify_until_they_expire(name: str) -> None:
    v = vector(name)
    joe = JwtRule(issuer="joe", jwks=json.dumps(v["jwks"]))
    exp = v["claims"]["exp"]
    ok = check(v["token"], joe, now=exp)
    assert ok.status == 0 and ok.reason == Reason.OK
    assert ok.facts is not None and dict(ok.facts.claims) == v["claims"]
    assert ok.facts.principal == ""  # no `sub`: no request principal (semantics 1.11)
    assert check(v["token"], joe, now=exp + 60).status == 0  # clock skew
    assert rejected(check(v["token"], joe, now=exp + 61), Reason.EXPIRED)
    assert rejected(check(v["token"], replace(joe, issuer="jane"), now=exp), Reason.UNKNOWN_ISSUER)


def test_rfc_7515_a2_signature_is_checked() -> None:
    v = vector("rfc7515_a2_rs256")
    head, _, signature = v["token"].split(".")
    forged = f"{head}.{segment({**v['claims'], 'http://example.com/is_root': False})}.{signature}"
    joe = JwtRule(issuer="joe", jwks=json.dumps(v["jwks"]))
    assert rejected(check(forged, joe, now=v["claims"]["exp"]), Reason.VERIFICATION_FAIL)


def test_rfc_8037_ed25519_example() -> None:
    v = vector("rfc8037_a4_ed25519")
    head, payload, signature = v["token"].split(".")
    (key,) = jwt_tokens._load_keys(json.dumps(v["jwks"]))
    signing_input = f"{head}.{payload}".encode()
    sig = base64.urlsafe_b64decode(signature + "==")
    assert key.verify("EdDSA", sig, signing_input) is Reason.OK
    assert key.verify("EdDSA", sig, signing_input + b"!") is Reason.VERIFICATION_FAIL
    assert key.verify("EdDSA", sig[:-1], signing_input) is Reason.ED25519_WRONG_LENGTH
    # Its payload is text, not a claims object: a JWT must carry a JSON object.
    ed = JwtRule(issuer="joe", jwks=json.dumps(v["jwks"]))
    assert rejected(check(v["token"], ed), Reason.PAYLOAD_BAD_JSON)


def test_rfc_7519_unsecured_and_hs256_examples_are_refused() -> None:
    v = vector("rfc7519_unsecured")
    joe = JwtRule(issuer="joe", jwks=json.dumps(vector("rfc7515_a2_rs256")["jwks"]))
    now = v["claims"]["exp"]
    assert rejected(check(v["token"], joe, now=now), Reason.BAD_FORMAT)  # empty signature
    assert rejected(check(v["token"] + "c2ln", joe, now=now), Reason.HEADER_ALG_NOT_SUPPORTED)
    assert rejected(check(v["hs256_token"], joe, now=now), Reason.HEADER_ALG_NOT_SUPPORTED)


# --- own keys, every algorithm --------------------------------------------------------------------

ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


@pytest.mark.parametrize("alg", ALGS)
def test_each_algorithm_verifies_and_detects_tampering(alg: str) -> None:
    issuer = Issuer(alg)
    token = issuer.sign(claims(aud="api", azp="web", scope="read write"))
    outcome = check(token, rule(keys=issuer))
    assert (outcome.status, outcome.reason) == (0, Reason.OK)
    assert outcome.facts is not None
    assert outcome.facts.principal == f"{ISS}/alice"
    assert outcome.facts.audiences == ("api",)
    assert outcome.facts.presenter == "web"
    assert outcome.facts.claims["scope"] == ["read", "write"]
    head, _, signature = token.split(".")
    forged = f"{head}.{segment(claims(sub='mallory'))}.{signature}"
    assert rejected(check(forged, rule(keys=issuer)), Reason.VERIFICATION_FAIL)
    other = Issuer(alg, serial=1)  # same kid, another key
    assert rejected(check(other.sign(claims()), rule(keys=issuer)), Reason.VERIFICATION_FAIL)


def test_a_jwks_with_several_key_types_picks_the_one_for_the_alg() -> None:
    keys = [Issuer(a, kid=None) for a in ("RS256", "ES384", "EdDSA")]
    jwks = keys[0].jwks(*keys[1:])
    for issuer in keys:
        assert check(issuer.sign(claims()), rule(keys=jwks)).status == 0


# --- alg / key matching ---------------------------------------------------------------------------


def test_alg_none_is_refused_even_with_a_signature_segment() -> None:
    unsigned = f"{segment({'alg': 'none'})}.{segment(claims())}"
    assert rejected(check(unsigned + ".", rule()), Reason.BAD_FORMAT)
    assert rejected(check(unsigned + ".AAAA", rule()), Reason.HEADER_ALG_NOT_SUPPORTED)
    assert rejected(check(unsigned.replace(segment({"alg": "none"}), segment({"alg": "None"}))
                          + ".AAAA", rule()), Reason.HEADER_ALG_NOT_SUPPORTED)  # fmt: skip


@pytest.mark.parametrize("encoding", ["pem", "der", "jwk-n"])
def test_hs256_signed_with_the_rsa_public_key_is_refused(encoding: str) -> None:
    public = RS.key.public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if encoding == "jwk-n":
        secret = RS.jwk()["n"].encode()
    else:
        kind = serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER
        secret = public.public_bytes(kind, spki)
    forged = hs256(secret, claims(), {"kid": "k1", "typ": "JWT"})
    assert rejected(check(forged, rule()), Reason.HEADER_ALG_NOT_SUPPORTED)


def test_a_jwks_symmetric_key_is_never_used() -> None:
    oct_and_rsa = json.dumps({"keys": [{"kty": "oct", "k": b64(b"s3cret")}, RS.jwk()]})
    forged = hs256(b"s3cret", claims())
    assert rejected(check(forged, rule(keys=oct_and_rsa)), Reason.HEADER_ALG_NOT_SUPPORTED)
    assert check(RS.sign(claims()), rule(keys=oct_and_rsa)).status == 0


@pytest.mark.parametrize(
    ("signer", "jwks"),
    [
        (Issuer("RS256"), Issuer("ES256").jwks()),  # RSA alg, EC key with the same kid
        (Issuer("ES256"), Issuer("ES384").jwks()),  # curve does not fit the alg
        (Issuer("ES384"), json.dumps({"keys": [Issuer("ES256").jwk(alg="ES256")]})),
        (Issuer("PS256"), json.dumps({"keys": [RS.jwk(alg="RS256")]})),  # key pinned to RS256
        (Issuer("RS256"), json.dumps({"keys": [RS.jwk(alg="PS256")]})),
        (Issuer("EdDSA"), RS.jwks()),
        (Issuer("RS256", kid="unknown"), RS.jwks()),  # unknown kid
    ],
)
def test_no_key_fits_the_kid_or_alg(signer: Issuer, jwks: str) -> None:
    assert rejected(check(signer.sign(claims()), rule(keys=jwks)), Reason.KID_ALG_MISMATCH)


def test_kid_matching() -> None:
    kidless = Issuer("RS256", kid=None)
    rotated = Issuer("RS256", kid="k2", serial=1)
    # A key without kid serves tokens with any kid; a token without kid tries every key.
    assert check(Issuer("RS256", kid="anything").sign(claims()), rule(keys=kidless)).status == 0
    assert check(Issuer("RS256", kid=None, serial=1).sign(claims()),
                 rule(keys=RS.jwks(rotated))).status == 0  # fmt: skip
    # With a kid, only keys with that kid (or none) are tried.
    assert check(rotated.sign(claims()), rule(keys=RS.jwks(rotated))).status == 0
    wrong = Issuer("RS256", kid="k1", serial=1)  # k1 names RS's key, signed with rotated's
    assert rejected(check(wrong.sign(claims()), rule(keys=RS.jwks(rotated))),
                    Reason.VERIFICATION_FAIL)  # fmt: skip


def test_jwks_rotation_takes_a_new_authenticator() -> None:
    old, new = Issuer("ES256", kid="2024"), Issuer("ES256", kid="2025", serial=1)
    before = JwtAuthenticator([rule(keys=old)])
    after = JwtAuthenticator([rule(keys=new)])
    old_token, new_token = old.sign(claims()), new.sign(claims())
    assert before.authenticate(bearer(old_token), "", NOW).status == 0
    assert rejected(before.authenticate(bearer(new_token), "", NOW), Reason.KID_ALG_MISMATCH)
    assert after.authenticate(bearer(new_token), "", NOW).status == 0
    assert rejected(after.authenticate(bearer(old_token), "", NOW), Reason.KID_ALG_MISMATCH)


def test_an_issuer_without_keys_rejects_its_tokens_fail_closed() -> None:
    pending = JwtRule(issuer=ISS, jwks_uri="https://issuer.example/jwks")
    assert rejected(check(RS.sign(claims()), pending), Reason.NO_VALID_KEYS)
    garbage = JwtRule(issuer=ISS, jwks="{not json")
    assert rejected(check(RS.sign(claims()), garbage), Reason.NO_VALID_KEYS)
    authenticator = JwtAuthenticator([pending])
    assert authenticator.authenticate({}, "", NOW).status == 0  # no token still passes


# --- malformed tokens -----------------------------------------------------------------------------

GOOD = RS.sign(claims())
HEAD, PAYLOAD, SIG = GOOD.split(".")
NAN_PAYLOAD = b64(b'{"exp": NaN}')
DEEP_PAYLOAD = b64(b"[" * 5000)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", Reason.BAD_FORMAT),
        ("abc", Reason.BAD_FORMAT),
        (f"{HEAD}.{PAYLOAD}", Reason.BAD_FORMAT),
        (f"{HEAD}.{PAYLOAD}.{SIG}.{SIG}", Reason.BAD_FORMAT),
        (f"{HEAD}..{SIG}", Reason.BAD_FORMAT),
        (f".{PAYLOAD}.{SIG}", Reason.BAD_FORMAT),
        ("a" * (64 * 1024) + f".{PAYLOAD}.{SIG}", Reason.TOO_LARGE),
        (f"AAAAA.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_BASE64),  # length 4n+1
        (f"{HEAD[:-2]}!!.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_BASE64),
        (f"{b64(b'{not json')}.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_JSON),
        (f"{b64(bytes([0xFF, 0xFE]))}.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_JSON),
        (f"{segment(['RS256'])}.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_JSON),
        (f"{segment({'typ': 'JWT'})}.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_ALG),
        (f"{segment({'alg': 256})}.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_ALG),
        (f"{segment({'alg': 'RS1'})}.{PAYLOAD}.{SIG}", Reason.HEADER_ALG_NOT_SUPPORTED),
        (f"{segment({'alg': 'RS256', 'kid': 7})}.{PAYLOAD}.{SIG}", Reason.HEADER_BAD_KID),
        (f"{segment({'alg': 'RS256', 'crit': ['exp']})}.{PAYLOAD}.{SIG}", Reason.HEADER_CRIT),
        (f"{HEAD}.{PAYLOAD}+.{SIG}", Reason.PAYLOAD_BAD_BASE64),
        (f"{HEAD}.{b64(b'[1]')}.{SIG}", Reason.PAYLOAD_BAD_JSON),
        (f"{HEAD}.{NAN_PAYLOAD}.{SIG}", Reason.PAYLOAD_BAD_JSON),
        (f"{HEAD}.{DEEP_PAYLOAD}.{SIG}", Reason.PAYLOAD_BAD_JSON),
        (f"{HEAD}.{segment(claims(iss=5))}.{SIG}", Reason.ISS_NOT_STRING),
        (f"{HEAD}.{segment(claims(sub=['a']))}.{SIG}", Reason.SUB_NOT_STRING),
        (f"{HEAD}.{segment(claims(jti=1))}.{SIG}", Reason.JTI_NOT_STRING),
        (f"{HEAD}.{segment(claims(aud=1))}.{SIG}", Reason.AUD_NOT_STRING),
        (f"{HEAD}.{segment(claims(aud=['a', 1]))}.{SIG}", Reason.AUD_NOT_STRING),
        (f"{HEAD}.{segment(claims(exp='tomorrow'))}.{SIG}", Reason.EXP_NOT_INTEGER),
        (f"{HEAD}.{segment(claims(exp=True))}.{SIG}", Reason.EXP_NOT_INTEGER),
        (f"{HEAD}.{segment(claims(exp=-1))}.{SIG}", Reason.EXP_OUT_OF_RANGE),
        (f"{HEAD}.{segment(claims(nbf=2**64))}.{SIG}", Reason.NBF_OUT_OF_RANGE),
        (f"{HEAD}.{segment(claims(nbf='x'))}.{SIG}", Reason.NBF_NOT_INTEGER),
        (f"{HEAD}.{segment(claims(iat=[1]))}.{SIG}", Reason.IAT_NOT_INTEGER),
        (f"{HEAD}.{segment(claims(iat=-5))}.{SIG}", Reason.IAT_OUT_OF_RANGE),
        (f"{HEAD}.{PAYLOAD}.{SIG[:-3]}/+=", Reason.SIGNATURE_BAD_BASE64),
        (f"{HEAD}.{PAYLOAD}.{SIG[:-8]}", Reason.VERIFICATION_FAIL),
    ],
)
def test_malformed_tokens_are_rejected_with_envoys_reason(token: str, reason: Reason) -> None:
    headers = {"x-token": token}
    custom = rule(from_headers=(TokenHeader("x-token"),))
    assert rejected(JwtAuthenticator([custom]).authenticate(headers, "", NOW), reason)


def test_ed25519_signature_of_the_wrong_length() -> None:
    ed = Issuer("EdDSA")
    head, payload, sig = ed.sign(claims()).split(".")
    short = f"{head}.{payload}.{b64(base64.urlsafe_b64decode(sig + '==')[:63])}"
    assert rejected(check(short, rule(keys=ed)), Reason.ED25519_WRONG_LENGTH)


def test_checks_run_in_envoys_order() -> None:
    head, payload, _ = RS.sign(claims(exp=NOW - 3600, aud="other")).split(".")
    unsigned = f"{head}.{payload}.{b64(b'x' * 256)}"
    # issuer, then time, then audience, then the signature
    assert rejected(check(unsigned, rule(issuer="elsewhere")), Reason.UNKNOWN_ISSUER)
    assert rejected(check(unsigned, rule(audiences=("api",))), Reason.EXPIRED)
    late = unsigned.replace(payload, segment(claims(aud="other")))
    assert rejected(check(late, rule(audiences=("api",))), Reason.AUDIENCE_NOT_ALLOWED, 403)
    assert rejected(check(late, rule()), Reason.VERIFICATION_FAIL)


# --- time -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "now", "reason"),
    [
        ({"exp": NOW}, NOW + 60, Reason.OK),
        ({"exp": NOW}, NOW + 60.999, Reason.OK),  # whole seconds, as Envoy
        ({"exp": NOW}, NOW + 61, Reason.EXPIRED),
        ({"exp": None}, NOW + 10**9, Reason.OK),  # no exp: never expires
        ({"exp": NOW + 0.5}, NOW + 60.9, Reason.OK),  # a fractional exp is truncated
        ({"nbf": NOW}, NOW - 60, Reason.OK),
        ({"nbf": NOW}, NOW - 61, Reason.NOT_YET_VALID),
        ({"nbf": NOW, "exp": NOW - 1000}, NOW - 61, Reason.NOT_YET_VALID),  # nbf first
        ({"iat": NOW + 60}, NOW, Reason.OK),
        ({"iat": NOW + 61}, NOW, Reason.ISSUED_IN_FUTURE),
        ({"iat": None}, NOW, Reason.OK),
    ],
)
def test_time_checks_with_clock_skew(extra: dict[str, Any], now: float, reason: Reason) -> None:
    outcome = check(RS.sign(claims(**extra)), rule(), now=now)
    assert outcome.reason == reason
    assert outcome.status == (0 if reason is Reason.OK else 401)


def test_clock_skew_is_configurable() -> None:
    token = RS.sign(claims(exp=NOW))
    assert check(token, rule(), now=NOW, clock_skew=0).status == 0
    assert rejected(check(token, rule(), now=NOW + 1, clock_skew=0), Reason.EXPIRED)


# --- issuer and audience --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aud", "audiences", "ok"),
    [
        ("api", ("api",), True),
        (["web", "api"], ("api",), True),
        (["web"], ("api", "admin"), False),
        (None, ("api",), False),
        ([], ("api",), False),
        ("anything", (), True),  # no audiences configured: not checked (Envoy)
        ("https://api.example/", ("api.example",), True),  # scheme and slash ignored
        ("http://api.example", ("https://api.example/",), True),
        ("api.example/v1", ("api.example",), False),
    ],
)
def test_audiences(aud: Any, audiences: tuple[str, ...], ok: bool) -> None:
    outcome = check(RS.sign(claims(aud=aud)), rule(audiences=audiences))
    if ok:
        assert outcome.status == 0
    else:
        assert rejected(outcome, Reason.AUDIENCE_NOT_ALLOWED, 403)


@pytest.mark.parametrize("iss", ["https://issuer.example/", "https://ISSUER.example", None])
def test_issuer_must_match_exactly(iss: str | None) -> None:
    assert rejected(check(RS.sign(claims(iss=iss)), rule()), Reason.UNKNOWN_ISSUER)


def test_principal_needs_iss_and_sub() -> None:
    outcome = check(RS.sign(claims(sub=None)), rule())
    assert outcome.facts is not None and outcome.facts.principal == ""
    outcome = check(RS.sign(claims(sub="")), rule())
    assert outcome.facts is not None and outcome.facts.principal == ""


def test_space_delimited_claims() -> None:
    token = RS.sign(claims(scope="a  b", permission="p", roles="x y", other="u v", empty=" "))
    outcome = check(token, rule(space_delimited_claims=("roles", "empty")))
    assert outcome.facts is not None
    c = outcome.facts.claims
    assert (c["scope"], c["permission"], c["roles"]) == (["a", "b"], ["p"], ["x", "y"])
    assert (c["other"], c["empty"]) == ("u v", " ")
    with pytest.raises(TypeError):
        c["scope"] = "changed"  # type: ignore[index]


# --- where the token is ---------------------------------------------------------------------------

TOKEN = RS.sign(claims())


@pytest.mark.parametrize(
    ("headers", "query", "found"),
    [
        ({"authorization": f"Bearer {TOKEN}"}, "", True),
        ({"authorization": f"Bearer   {TOKEN}  "}, "", True),  # token = the base64url run
        ({"authorization": f"Basic x, Bearer {TOKEN}"}, "", True),  # prefix found anywhere
        ({"authorization": f"bearer {TOKEN}"}, "", False),  # prefix is case-sensitive
        ({"authorization": TOKEN}, "", False),  # header without the prefix: missing
        ({}, f"access_token={TOKEN}", True),
        ({}, f"a=1&access_token={TOKEN}&b=2", True),
        ({}, f"access%5Ftoken={TOKEN.replace('.', '%2E')}", True),  # percent-decoded
        ({}, f"token={TOKEN}", False),
        ({"x-token": TOKEN}, "", False),
    ],
)
def test_default_locations(headers: dict[str, str], query: str, found: bool) -> None:
    outcome = JwtAuthenticator([rule()]).authenticate(headers, query, NOW)
    assert outcome.status == 0
    assert (outcome.facts is not None) is found


def test_explicit_locations_replace_the_defaults() -> None:
    custom = rule(from_headers=(TokenHeader("x-jwt", "Token "),), from_params=("jwt",),
                  from_cookies=("session",))  # fmt: skip
    authenticator = JwtAuthenticator([custom])

    def facts(headers: dict[str, str], query: str = "") -> bool:
        outcome = authenticator.authenticate(headers, query, NOW)
        assert outcome.status == 0, outcome.reason
        return outcome.facts is not None

    assert facts({"x-jwt": f"Token {TOKEN}"})
    assert not facts({"x-jwt": TOKEN})  # no prefix: missing
    assert facts({}, f"jwt={TOKEN}")
    assert facts({"cookie": f"a=b; session={TOKEN}; c=d"})
    assert facts({"cookie": f'session="{TOKEN}"'})
    # the defaults are not read any more: even a garbage token there is ignored
    assert not facts(bearer("garbage"), "access_token=garbage")
    bad = authenticator.authenticate({"x-jwt": "Token garbage"}, "", NOW)
    assert rejected(bad, Reason.BAD_FORMAT)


def test_a_header_without_prefix_takes_the_whole_value() -> None:
    custom = JwtAuthenticator([rule(from_headers=(TokenHeader("x-jwt"),))])
    assert custom.authenticate({"x-jwt": TOKEN}, "", NOW).facts is not None
    with_scheme = custom.authenticate({"x-jwt": f"Bearer {TOKEN}"}, "", NOW)
    assert rejected(with_scheme, Reason.HEADER_BAD_BASE64)  # "Bearer eyJ..." is the header


def test_every_token_of_a_rule_must_verify() -> None:
    expired = RS.sign(claims(exp=NOW - 3600))
    authenticator = JwtAuthenticator([rule()])
    both = authenticator.authenticate(bearer(TOKEN), f"access_token={expired}", NOW)
    assert rejected(both, Reason.EXPIRED)
    header_facts = authenticator.authenticate(
        bearer(TOKEN), f"access_token={RS.sign(claims(sub='bob'))}", NOW
    )
    assert header_facts.facts is not None and header_facts.facts.principal == f"{ISS}/alice"


def test_no_token_passes_without_identity() -> None:
    outcome = JwtAuthenticator([rule()]).authenticate({"host": "x"}, "a=b", NOW)
    assert (outcome.status, outcome.facts, outcome.reason) == (0, None, Reason.MISSING)


# --- several rules --------------------------------------------------------------------------------


def test_rules_sharing_a_location_pick_by_issuer() -> None:
    a, b = Issuer("RS256", kid="a"), Issuer("ES256", kid="b")
    rules = [rule("https://a.example", keys=a), rule("https://b.example", keys=b)]
    authenticator = JwtAuthenticator(rules)

    def run(token: str) -> JwtOutcome:
        return authenticator.authenticate(bearer(token), "", NOW)

    outcome = run(b.sign(claims(iss="https://b.example")))
    assert outcome.facts is not None and outcome.facts.principal == "https://b.example/alice"
    assert run(a.sign(claims(iss="https://a.example"))).status == 0
    assert rejected(run(a.sign(claims(iss="https://c.example"))), Reason.UNKNOWN_ISSUER)
    expired = b.sign(claims(iss="https://b.example", exp=NOW - 3600))
    assert rejected(run(expired), Reason.EXPIRED)  # the real failure wins over "unknown issuer"
    assert rejected(run(a.sign(claims(iss="https://b.example"))), Reason.KID_ALG_MISMATCH)


def test_rules_with_their_own_locations() -> None:
    a, b = Issuer("RS256", kid="a"), Issuer("ES256", kid="b")
    rules = [
        rule("https://a.example", keys=a, from_headers=(TokenHeader("x-a"),)),
        rule("https://b.example", keys=b, from_headers=(TokenHeader("x-b"),)),
    ]
    authenticator = JwtAuthenticator(rules)
    good_b = b.sign(claims(iss="https://b.example"))
    good_a = a.sign(claims(iss="https://a.example"))
    assert authenticator.authenticate({"x-b": good_b}, "", NOW).status == 0
    wrong_place = authenticator.authenticate({"x-a": good_b}, "", NOW)
    assert rejected(wrong_place, Reason.UNKNOWN_ISSUER)
    bad_b = b.sign(claims(iss="https://b.example", exp=NOW - 3600))
    assert rejected(authenticator.authenticate({"x-b": bad_b}, "", NOW), Reason.EXPIRED)
    # Istio's OR: one rule verifying all of its tokens is enough (as in Envoy).
    mixed = authenticator.authenticate({"x-a": good_a, "x-b": bad_b}, "", NOW)
    assert mixed.facts is not None and mixed.facts.principal == "https://a.example/alice"


# --- what the request becomes ---------------------------------------------------------------------


def test_the_token_is_removed_unless_forwarded() -> None:
    dropped = JwtAuthenticator([rule()])
    outcome = dropped.authenticate(bearer(TOKEN), "", NOW)
    assert (outcome.remove_headers, outcome.strip_query_param) == (("authorization",), None)
    outcome = dropped.authenticate({}, f"access_token={TOKEN}", NOW)
    assert (outcome.remove_headers, outcome.strip_query_param) == ((), "access_token")
    kept = JwtAuthenticator([rule(forward_original_token=True)])
    outcome = kept.authenticate(bearer(TOKEN), f"access_token={TOKEN}", NOW)
    assert (outcome.remove_headers, outcome.strip_query_param) == ((), None)


def test_payload_and_claims_are_copied_to_headers() -> None:
    payload = claims(tenant={"id": "t1", "tier": 2}, admin=True, n=42, ratio=1.5, groups=["a"],
                     evil="x\r\nset-cookie: y")  # fmt: skip
    token = RS.sign(payload)
    outputs = rule(
        output_payload_to_header="x-jwt-payload",
        output_claim_to_headers=tuple(
            ClaimToHeader(f"x-{claim.replace('.', '-')}", claim)
            for claim in ("sub", "tenant.id", "tenant.tier", "admin", "n", "ratio", "groups",
                          "tenant", "evil", "missing", "tenant.missing")
        ),
        forward_original_token=True,
    )  # fmt: skip
    outcome = JwtAuthenticator([outputs]).authenticate(bearer(token), "", NOW)
    assert outcome.status == 0
    headers = dict(outcome.set_headers)
    segment_ = token.split(".")[1]
    assert headers.pop("x-jwt-payload") == segment_
    assert json.loads(base64.urlsafe_b64decode(segment_ + "==")) == payload
    tenant = base64.b64decode(headers.pop("x-tenant"))
    assert json.loads(tenant) == {"id": "t1", "tier": 2}
    assert headers == {"x-sub": "alice", "x-tenant-id": "t1", "x-tenant-tier": "2",
                       "x-admin": "true", "x-n": "42", "x-ratio": "1.500000",
                       "x-groups": base64.b64encode(b'["a"]').decode()}  # fmt: skip
    # every output header is stripped from the request first (anti-spoofing)
    assert set(outcome.remove_headers) == {h.header for h in outputs.output_claim_to_headers} | {
        "x-jwt-payload"
    }


def test_output_headers_are_stripped_without_a_token_too() -> None:
    a = rule("https://a.example", output_payload_to_header="x-payload")
    b = rule("https://b.example", output_claim_to_headers=(ClaimToHeader("x-user", "sub"),))
    outcome = JwtAuthenticator([a, b]).authenticate({"x-user": "admin"}, "", NOW)
    assert outcome.status == 0 and outcome.facts is None
    assert set(outcome.remove_headers) == {"x-payload", "x-user"}


# --- caching --------------------------------------------------------------------------------------


def test_a_reused_token_is_answered_from_the_cache() -> None:
    authenticator = JwtAuthenticator([rule()])
    first = authenticator.authenticate(bearer(TOKEN), "", NOW)
    assert authenticator.authenticate(bearer(TOKEN), "", NOW + 5) is first
    forged = TOKEN[:-4] + "AAAA"
    bad = authenticator.authenticate(bearer(forged), "", NOW)
    assert authenticator.authenticate(bearer(forged), "", NOW) is bad


def test_the_cache_never_accepts_an_expired_token() -> None:
    token = RS.sign(claims(exp=NOW + 100, nbf=NOW))
    authenticator = JwtAuthenticator([rule()])
    assert rejected(authenticator.authenticate(bearer(token), "", NOW - 61), Reason.NOT_YET_VALID)
    assert authenticator.authenticate(bearer(token), "", NOW - 60).status == 0
    assert authenticator.authenticate(bearer(token), "", NOW + 160.5).status == 0
    assert rejected(authenticator.authenticate(bearer(token), "", NOW + 161), Reason.EXPIRED)
    # and a clock that goes back is answered for the time it says
    assert authenticator.authenticate(bearer(token), "", NOW).status == 0


def test_the_cache_is_bounded() -> None:
    authenticator = JwtAuthenticator([rule()], cache_entries=2)
    tokens = [RS.sign(claims(sub=f"u{i}")) for i in range(3)]
    first = [authenticator.authenticate(bearer(t), "", NOW) for t in tokens]
    assert authenticator.authenticate(bearer(tokens[2]), "", NOW) is first[2]
    again = authenticator.authenticate(bearer(tokens[0]), "", NOW)
    assert again is not first[0] and again == first[0]  # evicted, recomputed
    tiny = JwtAuthenticator([rule()], cache_bytes=len(TOKEN) - 1)
    assert tiny.authenticate(bearer(TOKEN), "", NOW) is not tiny.authenticate(
        bearer(TOKEN), "", NOW
    )


# --- helpers for the response and the proxy -------------------------------------------------------


def test_www_authenticate() -> None:
    assert www_authenticate("http", "api.example:8080", "/v1?x=1") == (
        'Bearer realm="http://api.example:8080/v1?x=1", error="invalid_token"'
    )
    assert (
        www_authenticate("http", 'a"b', "/")
        == 'Bearer realm="http://a\\"b/", error="invalid_token"'
    )


def test_cors_preflight() -> None:
    preflight = {"origin": "https://app", "access-control-request-method": "POST"}
    assert is_cors_preflight("OPTIONS", preflight)
    assert not is_cors_preflight("GET", preflight)
    assert not is_cors_preflight("OPTIONS", {"origin": "https://app"})


def test_importing_the_module_does_not_load_cryptography() -> None:
    code = (
        "import sys, agent.policy.jwt, agent.policy.jwks\n"
        "from agent.policy.jwt import JwtAuthenticator\n"
        "from agent.policy.jwt_rules import JwtRule\n"
        "JwtAuthenticator([JwtRule(issuer='i', jwks_uri='https://i/jwks')])\n"
        "print(any(m.split('.')[0] == 'cryptography' for m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
