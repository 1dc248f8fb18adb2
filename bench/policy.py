"""`make bench`, policy: what Ferry's API security policy costs, against Envoy with its filters.

    python -m bench.policy [--quick] [--workers N] [--duration S] [--rounds N] [--paths ...]
                           [--tokens N] [--jwt-alg ES256|RS256] [--changes N]

One simulated node (`SimNode`): a `server` pod with nginx on :80 (`GET /1k.bin`, 1 KiB), a
`client` pod that runs wrk against it, and an `intruder` pod that only ever sends the requests
that must be denied.  Traffic stays between these pods.  Each row is one policy on the server's
inbound side, measured with ``wrk --latency -t2 -c64`` keep-alive through Ferry and through
Envoy 1.40, one right after the other (the order alternates between rounds; `--rounds`, 2 by
default, pairs per row, and the table shows each proxy's best round, the least disturbed one):

none
    No policy.  Ferry relays bytes; Envoy's inbound listener is the plain ``tcp_proxy``.
l4
    An L4 AuthorizationPolicy: ALLOW from the client's IP (``ipBlocks: [<client>/32]``) to port
    80.  Envoy: ``envoy.filters.network.rbac`` before the ``tcp_proxy``.
l4-1000
    1,000 L4 rules in one ALLOW policy; only the last one matches the client.  The 999 others
    mix what an index has to get right and a linear scan has to test one by one: 333 name blocks
    that contain the client (its /32, /24, /16, the pod subnet...) but other ports, 333 name port
    80 with blocks of 16 different prefix lengths elsewhere, 333 name two other ports with two
    blocks each (a /32 and a /24 elsewhere).  Envoy: the same 1,000 RBAC policies, named so the
    matching one is tried last.  Each round also runs Ferry without policy right next to its
    1,000-rule run (``ferry, no policy``): the cost target is judged on these pairs, since the
    machine's load drifts a lot between rows minutes apart.
http
    ALLOW GET /1k.bin (methods and paths).  Envoy: ``http_connection_manager`` with
    ``envoy.filters.http.rbac`` and the router to the ORIGINAL_DST cluster.
jwt-same, jwt-fresh
    The HTTP rule plus ``requestPrincipals: [<issuer>/*]`` and a RequestAuthentication with an
    inline JWKS (`--jwt-alg`, ES256 by default, keys made for the run).  Every request carries a
    token (wrk with a Lua script, the same script for both rows): the same one every time
    (``jwt-same``), or the next of `--tokens` (50,000) pre-signed distinct tokens, each wrk thread
    rotating through its own half and every run starting past where the last one stopped
    (``jwt-fresh``: each proxy caches 10,000 verified tokens, so every request is a cache miss and
    a signature check; Envoy's ``jwt_cache_hit``/``jwt_cache_miss`` counters show it, and Ferry
    sees the same token sequence).  Envoy: ``envoy.filters.http.jwt_authn`` (the same JWKS
    inline, a token optional but verified when present: Istio's configuration, and its token
    cache on, as big as Ferry's) before the RBAC filter, whose principal requires the issuer's
    ``iss`` and a ``sub`` in the JWT payload.
ratelimit
    A RateLimitPolicy whose bucket never empties (10^9 tokens per second) for every request, and
    a 1-token bucket (refilled every 5 s) on ``/limited`` only.  Envoy:
    ``envoy.filters.http.local_ratelimit``, ``filter_enabled``/``filter_enforced`` 100 %, the same
    buckets (the tiny one on its own route).
propagation
    Two more simulated nodes linked together (`sim.ferry.Mesh`), a server and a client pod on
    each, both agents watching one policy folder.  A DENY (port 80 of the servers) is written to
    the folder (atomic rename) and each node's client polls its server with new connections
    until they are refused; the time from the rename to the first refusal, per node.  Then the
    file is removed and the time until requests pass again.  `--changes` times each, median
    reported.

Envoy's policy filters and Ferry's policy documents are both rendered from one description of the
row (`bench.envoy_policy.Policy`), so they say the same thing.  Envoy is placed as in `bench.run`
(`bench.envoy`: listeners in the pod netns, ORIGINAL_DST clusters, Ferry's own iptables rules);
Ferry is `agent run` + `agent proxy --workers N` with `policy.directory` set to a folder the bench
writes, the server enrolled with ``--label app=server`` (the policies select it).  Ferry and Envoy
never hold the pods at the same time: Ferry's phase enrolls the client and server, applies the
row's policy, and at the end goes back to no policy (so each phase starts with a newly compiled
policy and empty caches, as Envoy's new process does) and unenrolls them; Envoy's applies the
redirection, starts Envoy with the row's config, and removes the redirection after (checked
gone).  Ferry's agent and proxy run for the whole benchmark; the `intruder` stays enrolled.

Before measuring, every phase proves the row's policy is in force and applied by the proxy under
test: an allowed request gets 200, and the row's denied requests get what the policy says (the
intruder's connection reset; a wrong path or method 403; no token 403, a forged token 401; the
second request to ``/limited`` 429), and those denials show in the proxy's own counters; for
the L4 rows `agent policy check` names the rule that admits the client (the last of the 1,000).
Each measured run is then checked against the counters (Ferry: the server's policy decisions
and the connections it relayed, from the proxy's admin socket, read after the workers' 1 s
report interval; Envoy: its RBAC, JWT, rate limit and connection statistics): every request of
an HTTP row, and every connection of an L4 row, must have been decided by the row's policy.
Ferry's time from the policy file's rename to every worker on the new version is shown per row.

The L4 rows are also run with ``Connection: close`` (a new connection per request), since an L4
decision is made once per connection and keep-alive hides its cost.  The client pods reuse
TIME_WAIT ports (`reuse_time_wait`), or those runs would slow each other down.

Markdown tables and PASS/FAIL target lines on stdout, progress on stderr, everything in
`.bench-out/policy.json`.  The nodes, pods and every process are removed on exit, failure, Ctrl-C
or SIGTERM (`bench.common.execute`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import ipaddress
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.admin import request as admin_request
from agent.netns import entered
from bench.common import (
    FERRY_CONFIG,
    HTTP_PORT,
    OUT_DIR,
    Check,
    PodBench,
    Wrk,
    add_options,
    add_paths,
    check_lines,
    checks_json,
    execute,
    git_commit,
    json_document,
    latency,
    log,
    log_errors,
    markdown_table,
    parse_options,
    parse_wrk,
    preflight,
)
from bench.envoy import EnvoyPod, EnvoyProcess, envoy_config
from bench.envoy_policy import (
    HTTP_PREFIX,
    L4_RBAC_PREFIX,
    RATELIMIT_PREFIX,
    Bucket,
    HttpRule,
    Jwt,
    L4Rule,
    Policy,
    RateLimit,
    inbound_config,
)
from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes

REFERENCE = "ferry, no policy"
"""The label of the runs of Ferry without policy paired with the 1,000-rule ones."""
ROWS = ("none", "l4", "l4-1000", "http", "jwt-same", "jwt-fresh", "ratelimit")
NAMES = (*ROWS, "propagation")
L4_ROWS = ("none", "l4", "l4-1000")
HTTP_ROWS = ("http", "jwt-same", "jwt-fresh", "ratelimit")
LABELS = {
    "none": "no policy",
    "l4": "L4: ALLOW ipBlocks of the client",
    "l4-1000": "1,000 L4 rules (the last matches)",
    "http": "HTTP: ALLOW GET /1k.bin",
    "jwt-same": "HTTP + JWT, same token",
    "jwt-fresh": "HTTP + JWT, fresh tokens",
    "ratelimit": "rate limit, never triggers",
}
RESULTS = OUT_DIR / "policy.json"
Expect = Callable[[Wrk, dict[str, int]], tuple[dict[str, int], dict[str, int]]]
"""What a run (and the counters' deltas over it) must show: (policy decisions, wrk's
connections), each counter at least that much."""
NAMESPACE = "bench"
SELECTOR = {"app": "server"}
PATH = "/1k.bin"
PROBE_PATH = "/limited"
ISSUER = "https://issuer.ferry-bench.local"
AUDIENCE = "ferry-bench"
KID = "bench"
JWT_CACHE = 10_000
"""Verified tokens each proxy caches: Ferry's fixed size (agent.policy.jwt.CACHE_ENTRIES), the
same for Envoy's ``jwt_cache_config``."""
TOKEN_TTL = 6 * 3600
RULES = 1000
HUGE = Bucket(max_tokens=1_000_000_000, tokens_per_fill=1_000_000_000, fill_interval_s=1)
TINY = Bucket(max_tokens=1, tokens_per_fill=1, fill_interval_s=5)
"""The probe path's bucket: a second request within 5 s is refused (and the next round's probe,
many seconds later, finds a token again: Ferry's buckets outlive a policy re-applied)."""
CONNS = 64
THREADS = 2
PROPAGATION_TARGET_MS = 1000.0
FERRY_STATS_SETTLE = 1.3
"""Ferry's workers report their counters every second (agent.proxy.worker.STATS_INTERVAL): wait
this long before reading them, so a snapshot holds everything that happened before it."""
RULES_COST_TARGET = 0.10

LUA = """\
-- bench.policy: every request carries the next token of this wrk thread's slice of the pool.
-- args: token file, wrk threads, path, where to start in the slice (the bench moves it on after
-- every run, so a run never starts with the tokens the previous one just used).
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local tokens = {}
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  local per = math.max(1, math.floor(#tokens / tonumber(args[2])))
  local first = id * per
  if first + per > #tokens then first = 0 end
  requests = {}
  for i = 1, per do
    requests[i] = wrk.format("GET", args[3], {["Authorization"] = "Bearer " .. tokens[first + i]})
  end
  count = per
  index = tonumber(args[4]) % per
end

function request()
  index = index % count + 1
  return requests[index]
end
"""


# --- results -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One measured wrk run through one proxy, and what its counters said."""

    proxy: str
    round: int
    keepalive: Wrk
    close: Wrk | None = None
    counters: dict[str, int] = field(default_factory=dict)
    """The deltas of the proxy counters checked during the keep-alive run."""


@dataclass
class RowResult:
    name: str
    runs: list[Run] = field(default_factory=list)
    verified: dict[str, list[str]] = field(default_factory=dict)
    """Per proxy, what was checked before measuring."""
    propagation: dict[str, Any] = field(default_factory=dict)
    apply_ms: list[float] = field(default_factory=list)
    """Ferry: from the policy file's rename to every worker on the new version, per phase."""
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def best(self, proxy: str) -> Run | None:
        """The proxy's keep-alive run with the highest req/s (the least disturbed round)."""
        runs = [r for r in self.runs if r.proxy == proxy]
        return max(runs, key=lambda r: r.keepalive.rps) if runs else None

    def best_close(self, proxy: str) -> Wrk | None:
        closes = [r.close for r in self.runs if r.proxy == proxy and r.close is not None]
        return max(closes, key=lambda w: w.rps) if closes else None


@dataclass
class Options:
    quick: bool
    workers: int
    duration: float
    paths: tuple[str, ...]
    iperf_seconds: int
    """(bench.common's options; no iperf3 here)"""
    rounds: int
    tokens: int
    jwt_alg: str
    changes: int


# --- tokens --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokens:
    jwks: str
    valid: list[str]
    forged: str
    """Same header and claims, signed by another key: must be answered 401."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def signer(alg: str) -> tuple[dict[str, str], Callable[[bytes], bytes]]:
    """A new key for `alg` (ES256: P-256; RS256: 2048-bit RSA): its public JWK and a function
    that signs bytes with it (JWS form: ES256 is r || s, 32 bytes each)."""
    if alg == "RS256":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        n = rsa_key.public_key().public_numbers().n
        jwk = {"kty": "RSA", "n": b64(n.to_bytes(256, "big")), "e": "AQAB"}
        return jwk, lambda data: rsa_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if alg != "ES256":
        raise ValueError(f"unsupported JWT algorithm {alg}")
    ec_key = ec.generate_private_key(ec.SECP256R1())
    point = ec_key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "x": b64(point.x.to_bytes(32, "big")),
           "y": b64(point.y.to_bytes(32, "big"))}  # fmt: skip

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(ec_key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return jwk, sign


def make_tokens(alg: str, count: int) -> Tokens:
    """A key for `alg`, its JWKS, `count` distinct valid tokens and one forged token."""
    jwk, sign = signer(alg)
    _, sign_other = signer(alg)
    head = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": KID}).encode())
    now = int(time.time())

    def token(i: int, sign_with: Callable[[bytes], bytes]) -> str:
        claims = {
            "iss": ISSUER,
            "sub": f"user-{i}",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + TOKEN_TTL,
            "jti": f"{i}-{base64.b32encode(os.urandom(5)).decode()}",
        }
        signing_input = f"{head}.{b64(json.dumps(claims, separators=(',', ':')).encode())}"
        return f"{signing_input}.{b64(sign_with(signing_input.encode()))}"

    valid = [token(i, sign) for i in range(count)]
    jwks = json.dumps({"keys": [{**jwk, "kid": KID, "alg": alg, "use": "sig"}]})
    return Tokens(jwks, valid, token(count, sign_other))


# --- the rows' policies --------------------------------------------------------------------------


def thousand_rules(client_ip: str, pod_subnet: str) -> tuple[L4Rule, ...]:
    """999 rules the client does not match, then the one it does (see the module docstring)."""
    client = ipaddress.ip_address(client_ip)
    around = [
        f"{ipaddress.ip_network(f'{client}/{n}', strict=False)}"
        for n in (32, 31, 30, 28, 24, 20, 16, 12, 8)
    ] + [pod_subnet]
    rules: list[L4Rule] = []
    for i in range(333):  # the client's own blocks, other ports
        rules.append(L4Rule((around[i % len(around)],), (10000 + i,)))
    for i in range(333):  # port 80, blocks elsewhere with 16 prefix lengths
        prefix = 17 + i % 16
        base = ipaddress.ip_address(f"172.{16 + i % 16}.{i // 16}.{i % 256}")
        block = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
        rules.append(L4Rule((str(block),), (HTTP_PORT,)))
    for i in range(333):  # two blocks elsewhere, two ports each
        blocks = (f"198.18.{i // 256}.{i % 256}/32", f"100.{64 + i % 64}.{i // 64}.0/24")
        rules.append(L4Rule(blocks, (HTTP_PORT + 8000 + i, 20000 + i)))
    rules.append(L4Rule((f"{client}/32",), (HTTP_PORT,)))
    assert len(rules) == RULES
    return tuple(rules)


def row_policy(name: str, client_ip: str, pod_subnet: str, jwks: str) -> Policy:
    get = HttpRule(("GET",), (PATH,))
    if name == "none":
        return Policy()
    if name == "l4":
        return Policy(l4=(L4Rule((f"{client_ip}/32",), (HTTP_PORT,)),))
    if name == "l4-1000":
        return Policy(l4=thousand_rules(client_ip, pod_subnet))
    if name == "http":
        return Policy(http=(get,))
    if name in ("jwt-same", "jwt-fresh"):
        jwt = Jwt(ISSUER, (AUDIENCE,), jwks, JWT_CACHE)
        return Policy(http=(dataclasses.replace(get, issuer=ISSUER),), jwt=jwt)
    if name == "ratelimit":
        return Policy(rate_limit=RateLimit(HUGE, PROBE_PATH, TINY))
    raise ValueError(name)


def policy_name(row: str) -> str:
    return "jwt" if row.startswith("jwt") else row


def _metadata(row: str) -> dict[str, Any]:
    return {"name": policy_name(row), "namespace": NAMESPACE}


def _bucket(bucket: Bucket) -> dict[str, Any]:
    return {
        "maxTokens": bucket.max_tokens,
        "tokensPerFill": bucket.tokens_per_fill,
        "fillInterval": f"{bucket.fill_interval_s}s",
    }


def ferry_documents(row: str, policy: Policy) -> list[dict[str, Any]]:
    """Ferry's policy documents for `policy` (Istio's kinds and Ferry's RateLimitPolicy)."""
    if policy.l4 is not None and policy.http is not None:
        raise ValueError("L4 and HTTP ALLOW rules in one row are not the same thing in both")
    selector = {"matchLabels": dict(SELECTOR)}
    docs: list[dict[str, Any]] = []
    authz = "security.istio.io/v1"
    if policy.l4 is not None:
        rules = []
        for rule in policy.l4:
            entry: dict[str, Any] = {"from": [{"source": {"ipBlocks": list(rule.ip_blocks)}}]}
            if rule.ports:
                entry["to"] = [{"operation": {"ports": [str(p) for p in rule.ports]}}]
            rules.append(entry)
        spec = {"selector": selector, "action": "ALLOW", "rules": rules}
        docs.append(
            {
                "apiVersion": authz,
                "kind": "AuthorizationPolicy",
                "metadata": _metadata(row),
                "spec": spec,
            }
        )
    if policy.jwt is not None:
        jwt_rule = {
            "issuer": policy.jwt.issuer,
            "audiences": list(policy.jwt.audiences),
            "jwks": policy.jwt.jwks,
        }
        docs.append(
            {
                "apiVersion": authz,
                "kind": "RequestAuthentication",
                "metadata": _metadata(row),
                "spec": {"selector": selector, "jwtRules": [jwt_rule]},
            }
        )
    if policy.http is not None:
        rules = []
        for http in policy.http:
            entry = {
                "to": [{"operation": {"methods": list(http.methods), "paths": list(http.paths)}}]
            }
            if http.issuer is not None:
                entry["from"] = [{"source": {"requestPrincipals": [f"{http.issuer}/*"]}}]
            rules.append(entry)
        spec = {"selector": selector, "action": "ALLOW", "rules": rules}
        docs.append(
            {
                "apiVersion": authz,
                "kind": "AuthorizationPolicy",
                "metadata": _metadata(row),
                "spec": spec,
            }
        )
    if policy.rate_limit is not None:
        limit = policy.rate_limit
        rules = [
            {"match": {"paths": [limit.probe_path]}, "bucket": _bucket(limit.probe_bucket)},
            {"match": {"paths": ["*"]}, "bucket": _bucket(limit.bucket)},
        ]
        docs.append(
            {
                "apiVersion": "ferry.dev/v1alpha1",
                "kind": "RateLimitPolicy",
                "metadata": _metadata(row),
                "spec": {"selector": selector, "rules": rules},
            }
        )
    return docs


def expected_policies(row: str, policy: Policy) -> list[str]:
    """What Ferry's status must list for the server once the row's documents are in force."""
    return sorted(
        f"{d['kind']} {NAMESPACE}/{policy_name(row)}" for d in ferry_documents(row, policy)
    )


# --- probes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one curl got: the HTTP status (0: none) and curl's exit status."""

    status: int
    exit: int

    @property
    def reset(self) -> bool:
        """No HTTP answer: refused (7), empty reply (52) or reset (56)."""
        return self.status == 0 and self.exit in (7, 52, 56)

    def __str__(self) -> str:
        return f"HTTP {self.status}" if self.status else f"no answer (curl exit {self.exit})"


def ask(pod: Pod, url: str, *args: str) -> Answer:
    reply = pod.curl(url, timeout=5.0, args=["-o", "/dev/null", "-w", "%{http_code}", *args])
    code = reply.stdout.strip()
    return Answer(int(code) if code.isdigit() else 0, reply.returncode)


def reuse_time_wait(pod: Pod) -> None:
    """``net.ipv4.tcp_tw_reuse=1`` in the pod's netns (a per-netns setting).

    Through a proxy the response's FIN reaches the client after the response (the proxy relays
    the upstream's close separately), so wrk closes first and its sockets to server:80 stay in
    TIME_WAIT in the client pod; after ~14,000 of them (two or three close runs within a minute)
    connect() crawls looking for a free port and a close run through either proxy drops from
    thousands to a few hundred connections per second.  Letting connect() reuse them (TCP
    timestamps make it safe) keeps each run independent of the ones before it.
    """
    out = pod.exec(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
    if out.returncode != 0:
        raise RuntimeError(f"sysctl in {pod.netns}: {out.stderr}")


def bearer(token: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {token}")


# --- the benchmark -------------------------------------------------------------------------------


class PolicyBench(PodBench[Options, Any]):
    def __init__(self, opts: Options) -> None:
        super().__init__(opts, RowResult)
        self.node: SimNode | None = None
        self.intruder: Pod | None = None
        self.ferry: FerryNode | None = None
        self.policy_dir: Path | None = None
        self.policy_text = ""
        """What the bench last wrote to the policy folder (it starts empty)."""
        self.tokens: Tokens | None = None
        self.token_files: dict[str, Path] = {}
        self.token_offsets: dict[str, int] = {}
        """Per JWT row, where in its slice of the pool each wrk thread starts the next run."""
        self.lua: Path | None = None
        self.propagation_nodes: list[SimNode] = []
        self.wrk_errors: list[str] = []
        """wrk's error lines of every run that had errors."""

    # -- setup and teardown --

    def setup(self) -> None:
        log("policy: building the simulated node and pods")
        self.node = SimNode("pol")
        self.server = self.node.add_pod("server")
        self.client = self.node.add_pod("client")
        self.intruder = self.node.add_pod("intruder")
        self.nginx = self.server.start_nginx(HTTP_PORT)
        reuse_time_wait(self.client)
        rows = [p for p in self.opts.paths if p in ROWS]
        if any(r.startswith("jwt") for r in rows):
            started = time.monotonic()
            self.tokens = make_tokens(self.opts.jwt_alg, self.opts.tokens)
            log(
                f"{self.opts.tokens:,} {self.opts.jwt_alg} tokens in "
                f"{time.monotonic() - started:.1f}s"
            )
            self.token_files["jwt-same"] = self.node.tmpdir / "token-same.txt"
            self.token_files["jwt-same"].write_text(self.tokens.valid[0] + "\n")
            self.token_files["jwt-fresh"] = self.node.tmpdir / "tokens-fresh.txt"
            self.token_files["jwt-fresh"].write_text("\n".join(self.tokens.valid) + "\n")
            self.lua = self.node.tmpdir / "tokens.lua"
            self.lua.write_text(LUA)
        if rows:
            self.policy_dir = self.node.tmpdir / "policies"
            self.policy_dir.mkdir()
            config = {**FERRY_CONFIG, "policy": {"directory": str(self.policy_dir)}}
            self.ferry = FerryNode(self.node, workers=self.opts.workers, config=config)
            log(f"ferry: starting agent and proxy (--workers {self.opts.workers})")
            self.ferry.start()
            self.ferry.enroll(self.intruder, NAMESPACE, "intruder")
        log(
            f"node {self.node.name}: server {self.server.ip4}, client {self.client.ip4}, "
            f"intruder {self.intruder.ip4}"
        )

    def nodes(self) -> list[SimNode | None]:
        return [*self.propagation_nodes, self.node]

    def teardown(self) -> None:
        if self.ferry is not None:
            with contextlib.suppress(Exception):
                self.stop_ferry([self.ferry], [])
        super().teardown()

    def runners(self) -> dict[str, Callable[[], None]]:
        runners: dict[str, Callable[[], None]] = {
            name: functools.partial(self.run_row, name) for name in ROWS
        }
        runners["propagation"] = self.run_propagation
        return runners

    def row(self, name: str) -> RowResult:
        result: RowResult = self.result(name)
        return result

    @property
    def pods(self) -> tuple[SimNode, Pod, Pod, Pod]:
        assert self.node and self.client and self.server and self.intruder
        return self.node, self.client, self.server, self.intruder

    def url(self, path: str = PATH) -> str:
        return f"http://{self.ends[1].ip4}:{HTTP_PORT}{path}"

    # -- one row --

    def run_row(self, name: str) -> None:
        result = self.row(name)
        _, client, server, _ = self.pods
        assert self.tokens is not None or not name.startswith("jwt")
        jwks = self.tokens.jwks if self.tokens else ""
        subnet = str(ipaddress.ip_network(f"{server.ip4}/24", strict=False))
        policy = row_policy(name, client.ip4, subnet, jwks)
        for round_ in range(self.opts.rounds):
            phases = [
                functools.partial(self.ferry_phase, name, policy, result, round_),
                functools.partial(self.envoy_phase, name, policy, result, round_),
            ]
            if name == "l4-1000":  # Ferry without policy right next to it: the paired reference
                reference = functools.partial(
                    self.ferry_phase, name, Policy(), result, round_, REFERENCE
                )
                phases.insert(0, reference)
            if round_ % 2:
                phases.reverse()
            for phase in phases:
                phase()
        ferry, envoy = result.best("ferry"), result.best("envoy")
        if ferry and envoy:
            log(
                f"{name}: ferry {ferry.keepalive.rps:,.0f} req/s, envoy "
                f"{envoy.keepalive.rps:,.0f} req/s (best of {self.opts.rounds})"
            )

    def measure_row(
        self,
        name: str,
        result: RowResult,
        proxy: str,
        round_: int,
        counters: Callable[[], dict[str, int]],
        expect: Expect,
        after_warmup: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        """Warm-up, the keep-alive run checked against `counters` (each must grow by at least
        what `expect` says for the run: the policy's decisions, or the row fails; wrk's
        connections, or a note says so), and for the L4 rows a close run.  `after_warmup` gets
        the counters read after the warm-up."""
        log(f"{name}: {proxy}: warm-up, then wrk -t{THREADS} -c{CONNS} keep-alive")
        first = self.token_offsets.get(name, 0)
        self.wrk_run(name, duration=1)
        before = counters()
        if after_warmup is not None:
            after_warmup(before)
        run = self.wrk_run(name)
        after = counters()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
        measured = Run(proxy, round_, run, counters=delta)
        must, conns = expect(run, delta)
        short = {k: (delta.get(k, 0), n) for k, n in must.items() if delta.get(k, 0) < n}
        if short:
            raise RuntimeError(
                f"{proxy}: the run's {run.requests} requests were not all decided by the "
                f"policy: counter (delta, expected at least) {short}"
            )
        few = {k: (delta.get(k, 0), n) for k, n in conns.items() if delta.get(k, 0) < n}
        if few:
            result.notes.append(
                f"{proxy} round {round_}: fewer than wrk's {CONNS} connections were counted "
                f"(delta, expected): {few}"
            )
        if run.errors:
            result.notes.append(
                f"{proxy} round {round_}: wrk reported {run.errors} errors ({self.wrk_errors[-1]})"
            )
        self.freshness(name, result, proxy, round_, run, delta, first)
        if name in L4_ROWS:
            log(f"{name}: {proxy}: wrk -c{CONNS} Connection: close")
            before = counters()
            measured.close = self.wrk_run(name, close=True)
            after = counters()
            counted = min(after.get(k, 0) - before.get(k, 0) for k in (*must, *conns))
            if counted < measured.close.requests:
                result.notes.append(
                    f"{proxy} round {round_}: close run: {measured.close.requests} requests, "
                    f"only {counted} connections or decisions counted"
                )
            if measured.close.errors:
                result.notes.append(
                    f"{proxy} round {round_}: close run: wrk reported "
                    f"{measured.close.errors} errors ({self.wrk_errors[-1]})"
                )
        result.runs.append(measured)
        log(
            f"{name}: {proxy}: {run.rps:,.0f} req/s, p50 {latency(run.p50_us)}, "
            f"p99 {latency(run.p99_us)}"
        )

    def freshness(
        self,
        name: str,
        result: RowResult,
        proxy: str,
        round_: int,
        run: Wrk,
        delta: dict[str, int],
        first: int,
    ) -> None:
        """jwt-fresh: a note when Envoy's cache answered more than 1 % of the run (its cache is
        as big as Ferry's and both see the same token sequence, so the figure holds for both),
        or when, since offset `first`, a wrk thread may have gone round its slice of the pool."""
        if name != "jwt-fresh" or self.tokens is None:
            return
        hits = delta.get(f"http.{HTTP_PREFIX}.jwt_authn.jwt_cache_hit", 0)
        if proxy == "envoy" and hits > run.requests / 100:
            result.notes.append(
                f"envoy round {round_}: {hits:,} of {run.requests:,} tokens were JWT cache hits"
            )
        per_thread = len(self.tokens.valid) // THREADS
        if self.token_offsets.get(name, 0) - first > per_thread:
            result.notes.append(
                f"{proxy} round {round_}: the warm-up and the run went round a wrk thread's "
                f"{per_thread:,} tokens: tokens were reused (run with a larger --tokens)"
            )

    def wrk_run(self, name: str, duration: float = 0.0, close: bool = False) -> Wrk:
        """wrk in the client pod against nginx's /1k.bin; the JWT rows through the token script."""
        client, _ = self.ends
        seconds = duration or self.opts.duration
        argv = ["wrk", "--latency", "-t", str(THREADS), "-c", str(CONNS), "-d", f"{seconds:g}s"]
        argv += ["--timeout", "5s"]
        if close:
            argv += ["-H", "Connection: close"]
        tail: list[str] = []
        if name in self.token_files:
            assert self.lua is not None
            argv += ["-s", str(self.lua)]
            offset = self.token_offsets.get(name, 0)
            tail = ["--", str(self.token_files[name]), str(THREADS), PATH, str(offset)]
        argv += [self.url(), *tail]
        out = client.exec(argv, timeout=seconds + 60)
        if out.returncode != 0:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
        run = parse_wrk(out.stdout)
        if run.errors:
            detail = [line.strip() for line in out.stdout.splitlines() if "errors" in line
                      or "Non-2xx" in line]  # fmt: skip
            self.wrk_errors.append(f"{name}: " + "; ".join(detail))
        if tail:  # no thread sent more than all the requests, plus what was in flight
            self.token_offsets[name] = offset + run.requests + CONNS
        return run

    # -- checks common to both proxies --

    def check_denials(self, name: str, policy: Policy) -> list[str]:
        """The row's allowed request gets 200 and its denied ones what the policy says; what was
        checked, as lines for the report.  Raises when a check fails."""
        _, client, _, intruder = self.pods
        checks: list[tuple[str, Pod, str, tuple[str, ...], Callable[[Answer], bool]]] = []
        token = self.tokens.valid[0] if self.tokens else ""
        ok_args = bearer(token) if policy.jwt else ()
        checks.append((f"client GET {PATH}", client, PATH, ok_args, lambda a: a.status == 200))
        if policy.l4 is not None:
            checks.append((f"intruder GET {PATH}", intruder, PATH, (), lambda a: a.reset))
        if policy.http is not None:
            for what, path, args in (
                ("GET /index.html", "/index.html", ok_args),
                (f"POST {PATH}", PATH, (*ok_args, "-X", "POST")),
            ):
                checks.append((f"client {what}", client, path, args, lambda a: a.status == 403))
        if policy.jwt is not None and self.tokens is not None:
            checks.append(
                (f"client GET {PATH} without a token", client, PATH, (), lambda a: a.status == 403)
            )
            checks.append(
                (
                    f"client GET {PATH} with a forged token",
                    client,
                    PATH,
                    bearer(self.tokens.forged),
                    lambda a: a.status == 401,
                )
            )
        if policy.rate_limit is not None:
            probe = policy.rate_limit.probe_path
            checks.append(
                (f"client GET {probe} (1st)", client, probe, (), lambda a: a.status == 404)
            )
            checks.append(
                (f"client GET {probe} (2nd)", client, probe, (), lambda a: a.status == 429)
            )
        lines = []
        for what, pod, path, args, good in checks:
            answer = ask(pod, self.url(path), *args)
            if not good(answer):
                raise RuntimeError(f"{name}: {what}: unexpected {answer}")
            lines.append(f"{what}: {answer}")
        return lines

    # -- Ferry --

    def ferry_phase(
        self, name: str, policy: Policy, result: RowResult, round_: int, proxy: str = "ferry"
    ) -> None:
        ferry = self.ferry
        assert ferry is not None
        _, client, server, _ = self.pods
        self.ensure_no_redirection()
        enrolled: list[Pod] = []
        try:
            log(f"{name}: {proxy}: enrolling client and server, applying the policy")
            ferry.enroll(client, NAMESPACE, "client")
            enrolled.append(client)
            ferry.cli(
                "enroll",
                server.netns,
                "--namespace",
                NAMESPACE,
                "--service-account",
                "server",
                *(f"--label={k}={v}" for k, v in SELECTOR.items()),
                check=True,
            )
            enrolled.append(server)
            applied = self.apply_ferry_policy(name, policy)
            if applied is not None:
                result.apply_ms.append(applied)
            counters, expect = self.ferry_counters(name, policy)
            before = counters()
            lines = self.check_denials(name, policy)
            lines += self.ferry_decided_by(name, policy)

            def denials(after: dict[str, int]) -> None:  # the warm-up only adds allowed ones
                lines.extend(self.ferry_denials(name, policy, before, after))

            self.measure_row(name, result, proxy, round_, counters, expect, denials)
            result.verified.setdefault(proxy, lines)
            self.ferry_health(result)
            # Back to no policy, so the next phase starts from a newly compiled policy with empty
            # caches (JWT), as Envoy's does (a new process each time).
            self.apply_ferry_policy("none", Policy())
        except BaseException:
            with contextlib.suppress(Exception):
                log("ferry logs (tail):\n" + ferry.log_text()[-3000:])
            raise
        finally:
            for pod in enrolled:
                with contextlib.suppress(Exception):
                    ferry.cli("unenroll", pod.netns, check=True)
        self.ensure_no_redirection()

    def proxy_status(self, ferry: FerryNode | None = None) -> dict[str, Any]:
        ferry = ferry or self.ferry
        assert ferry is not None
        reply = admin_request(ferry.state_dir / "proxy.sock", {"op": "status"}, timeout=10)
        if not reply.get("ok", False):
            raise RuntimeError(f"proxy status failed: {reply}")
        return reply

    def server_entry(self, status: dict[str, Any]) -> dict[str, Any]:
        _, _, server, _ = self.pods
        for entry in status.get("workloads", {}).values():
            if entry.get("name") == server.netns:
                return dict(entry)
        raise RuntimeError(f"{server.netns} is not served by the proxy")

    def apply_ferry_policy(self, name: str, policy: Policy) -> float | None:
        """Write the row's documents (one file, atomic rename), then wait until every worker
        enforces the agent's new version and the server is selected by exactly them; the ms
        that took (None when the folder already held them)."""
        assert self.policy_dir is not None
        docs = ferry_documents(name, policy)
        text = yaml.safe_dump_all(docs, sort_keys=False) if docs else ""
        target = self.policy_dir / "bench.yaml"
        before = self.proxy_status()["policy"].get("version")
        if text != self.policy_text:
            started = time.monotonic()
            if text:
                tmp = self.policy_dir / ".bench.yaml.tmp"
                tmp.write_text(text)
                tmp.replace(target)
            else:
                target.unlink(missing_ok=True)
            self.policy_text = text
        else:
            started, before = None, None
        want = expected_policies(name, policy)
        deadline = time.monotonic() + 15
        while True:
            status = self.proxy_status()
            version = status["policy"].get("version")
            applied = {a.get("policy_version") for a in status.get("applied", [])}
            policies = sorted(self.server_entry(status).get("policies", []))
            if version != before and applied == {version} and policies == want:
                break
            if time.monotonic() > deadline:
                agent = self.ferry.status() if self.ferry else {}
                raise RuntimeError(
                    f"{name}: policy not in force after 15 s: version {version} (was {before}), "
                    f"workers {applied}, server policies {policies} (want {want}); agent "
                    f"policy: {json.dumps(agent.get('policy'))[:1500]}"
                )
            time.sleep(0.05)
        if started is None:
            return None
        elapsed = (time.monotonic() - started) * 1e3
        log(f"{name}: ferry: policy version {version} in force after {elapsed:.0f} ms "
            f"({len(text):,} bytes)")  # fmt: skip
        return elapsed

    def ferry_decided_by(self, name: str, policy: Policy) -> list[str]:
        """For the L4 rows, `agent policy check` says which rule admits the client."""
        if policy.l4 is None:
            return []
        assert self.ferry is not None
        _, client, server, intruder = self.pods
        lines = []
        for pod, allowed in ((client, True), (intruder, False)):
            out = self.ferry.cli(
                "policy",
                "check",
                server.netns,
                "--from-ip",
                pod.ip4,
                "--port",
                str(HTTP_PORT),
                "--json",
            )
            reply = json.loads(out.stdout)
            if reply.get("allowed") is not allowed:
                raise RuntimeError(f"{name}: agent policy check for {pod.name}: {reply}")
            if allowed and reply.get("rule") != len(policy.l4) - 1:
                raise RuntimeError(
                    f"{name}: the client is admitted by rule {reply.get('rule')}, "
                    f"not the last one: {reply}"
                )
            lines.append(
                f"agent policy check from {pod.name}: allowed={reply['allowed']} "
                f"policy {reply.get('policy') or '-'} rule {reply.get('rule')} "
                f"({reply.get('reason')})"
            )
        return lines

    def ferry_counters(
        self, name: str, policy: Policy
    ) -> tuple[Callable[[], dict[str, int]], Expect]:
        """The server's decisions and both pods' relayed connections, and what a run must add."""
        _, client, _, _ = self.pods
        ref = f"{NAMESPACE}/{policy_name(name)}"

        def counters() -> dict[str, int]:
            time.sleep(FERRY_STATS_SETTLE)
            status = self.proxy_status()
            entry = self.server_entry(status)
            out = {
                "server inbound connections": int(entry["traffic"]["inbound"]["connections_opened"])
            }
            for e in status["workloads"].values():
                if e.get("name") == client.netns:
                    out["client outbound connections"] = int(
                        e["traffic"]["outbound"]["connections_opened"]
                    )
            for d in entry.get("decisions", []):
                key = f"decisions {d['policy'] or '-'} {d['action'] or '-'} {d['decision']}"
                out[key] = int(d["count"])
            return out

        def expect(run: Wrk, delta: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
            inbound = "server inbound connections"
            conns = {inbound: CONNS, "client outbound connections": CONNS}
            must = {inbound: 1}
            if policy.l4 is not None:
                must[f"decisions {ref} ALLOW allow"] = max(1, delta.get(inbound, 0))
            if policy.http is not None:
                must[f"decisions {ref} ALLOW allow"] = run.requests
            if policy.rate_limit is not None:
                must[f"decisions {ref} RATELIMIT allow"] = run.requests
            return must, conns

        return counters, expect

    @staticmethod
    def ferry_denials(
        name: str, policy: Policy, before: dict[str, int], after: dict[str, int]
    ) -> list[str]:
        """The denials `check_denials` caused show in the server's decision counters."""
        want: dict[str, int] = {}
        if policy.l4 is not None:
            want["decisions - ALLOW deny"] = 1
        if policy.http is not None:
            want["decisions - ALLOW deny"] = 3 if policy.jwt else 2
        if policy.jwt is not None:
            want["decisions - JWT deny"] = 1
        if policy.rate_limit is not None:
            want[f"decisions {NAMESPACE}/{policy_name(name)} RATELIMIT deny"] = 1
        lines = []
        for key, n in want.items():
            seen = after.get(key, 0) - before.get(key, 0)
            if seen < n:
                raise RuntimeError(f"{name}: ferry counter {key} grew by {seen}, expected {n}")
            lines.append(f"ferry {key} +{seen}")
        return lines

    def ferry_health(self, result: RowResult) -> None:
        assert self.ferry is not None
        proxy = self.proxy_status()
        if proxy.get("workers_alive") != proxy.get("workers"):
            result.notes.append(
                f"ferry: only {proxy.get('workers_alive')} of {proxy.get('workers')} workers alive"
            )

    # -- Envoy --

    def envoy_phase(self, name: str, policy: Policy, result: RowResult, round_: int) -> None:
        node, client, server, _ = self.pods
        cfg = self.redirection_cfg
        self.ensure_no_redirection()
        envoy: EnvoyProcess | None = None
        try:
            log(f"{name}: envoy: Ferry's redirection in client and server, starting Envoy")
            for pod in (client, server):
                self.redirection.apply(Path(pod.netns_path))
            pods = [EnvoyPod(p.name, p.netns_path) for p in (client, server)]
            base = envoy_config(
                pods,
                admin_socket="",
                mark=cfg.mark,
                outbound_port=cfg.outbound_port,
                inbound_port=cfg.inbound_port,
            )
            inbound = f"in-{server.name}"
            bootstrap = inbound_config(base, inbound, inbound, policy)
            bootstrap.pop("admin")
            envoy = EnvoyProcess(
                node,
                [],
                self.opts.workers,
                cfg.mark,
                tag=f"envoy-{name}-{round_}",
                config=bootstrap,
            )
            envoy.wait_ready()
            counters, expect = self.envoy_counters(envoy, policy)
            before = counters()
            lines = self.check_denials(name, policy)
            lines += self.envoy_denials(name, policy, before, counters())
            result.verified.setdefault("envoy", lines)
            self.measure_row(name, result, "envoy", round_, counters, expect)
            if envoy.proc.poll() is not None:
                raise RuntimeError(f"envoy exited ({envoy.proc.returncode}): {envoy.logs()}")
        except BaseException:
            if envoy is not None:
                with contextlib.suppress(Exception):
                    log(f"envoy logs (tail):\n{envoy.logs()}")
            raise
        finally:
            if envoy is not None:
                envoy.stop()
            self.remove_redirection()
        self.ensure_no_redirection()

    @staticmethod
    def envoy_counters(
        envoy: EnvoyProcess, policy: Policy
    ) -> tuple[Callable[[], dict[str, int]], Expect]:
        outbound = "tcp.out-client.downstream_cx_total"
        inbound = (
            f"http.{HTTP_PREFIX}.downstream_cx_total"
            if policy.needs_http
            else ("tcp.in-server.downstream_cx_total")
        )
        l4_allowed = f"{L4_RBAC_PREFIX}.rbac.allowed"
        http_allowed = f"http.{HTTP_PREFIX}.rbac.allowed"
        jwt_allowed = f"http.{HTTP_PREFIX}.jwt_authn.allowed"
        limit_ok = f"{RATELIMIT_PREFIX}.http_local_rate_limit.ok"
        pattern = (
            r"^(tcp\.(out-client|in-server)\.downstream_cx_total|"
            rf"http\.{HTTP_PREFIX}\.(downstream_cx_total|rbac\..*|jwt_authn\..*)|"
            rf"{L4_RBAC_PREFIX}\.rbac\..*|{RATELIMIT_PREFIX}\.http_local_rate_limit\..*)$"
        )

        def counters() -> dict[str, int]:
            return envoy.stats(pattern)

        def expect(run: Wrk, delta: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
            must = {inbound: 1}
            if policy.l4 is not None:
                must[l4_allowed] = max(1, delta.get(inbound, 0))
            if policy.http is not None:
                must[http_allowed] = run.requests
            if policy.jwt is not None:
                must[jwt_allowed] = run.requests
            if policy.rate_limit is not None:
                must[limit_ok] = run.requests
            return must, {outbound: CONNS, inbound: CONNS}

        return counters, expect

    @staticmethod
    def envoy_denials(
        name: str, policy: Policy, before: dict[str, int], after: dict[str, int]
    ) -> list[str]:
        """The denials `check_denials` caused show in the filters' own statistics."""
        want: dict[str, int] = {}
        if policy.l4 is not None:
            want[f"{L4_RBAC_PREFIX}.rbac.denied"] = 1
        if policy.http is not None:
            want[f"http.{HTTP_PREFIX}.rbac.denied"] = 3 if policy.jwt else 2
        if policy.jwt is not None:
            want[f"http.{HTTP_PREFIX}.jwt_authn.denied"] = 1
        if policy.rate_limit is not None:
            want[f"{RATELIMIT_PREFIX}.http_local_rate_limit.rate_limited"] = 1
        lines = []
        for key, n in want.items():
            seen = after.get(key, 0) - before.get(key, 0)
            if seen < n:
                raise RuntimeError(f"{name}: envoy counter {key} grew by {seen}, expected {n}")
            lines.append(f"envoy {key} +{seen}")
        return lines

    # -- propagation --

    def run_propagation(self) -> None:
        result = self.row("propagation")
        log("propagation: two linked nodes, a server and a client pod on each")
        nodes = [SimNode("pa"), SimNode("pb")]
        self.propagation_nodes = nodes
        link_nodes(nodes[0], nodes[1])
        servers = [n.add_pod("server") for n in nodes]
        clients = [n.add_pod("client") for n in nodes]
        for server in servers:
            server.start_nginx(HTTP_PORT)
        for client in clients:
            reuse_time_wait(client)
        mesh = Mesh(nodes[0].tmpdir / "mesh")
        folder = mesh.workdir / "policies"
        folder.mkdir(parents=True)
        config = {**FERRY_CONFIG, "policy": {"directory": str(folder)}}
        ferries = [mesh.add(n, workers=self.opts.workers, config=dict(config)) for n in nodes]
        try:
            for ferry, server, client in zip(ferries, servers, clients, strict=True):
                ferry.start()
                ferry.enroll(client, NAMESPACE, "client")
                ferry.cli(
                    "enroll",
                    server.netns,
                    "--namespace",
                    NAMESPACE,
                    "--service-account",
                    "server",
                    "--label=app=server",
                    check=True,
                )
            pollers = [
                Poller(client.netns_path, server.ip4, node.name)
                for node, client, server in zip(nodes, clients, servers, strict=True)
            ]
            self.propagate(result, folder, pollers)
            for ferry in ferries:
                problems = log_errors(ferry.log_text())
                if problems:
                    result.notes.append(
                        f"{ferry.node.name}: {len(problems)} error line(s) in the Ferry logs, "
                        f"e.g. {problems[0]}"
                    )
        except BaseException:
            for ferry in ferries:
                with contextlib.suppress(Exception):
                    log(f"{ferry.node.name} logs (tail):\n{ferry.log_text()[-3000:]}")
            raise
        finally:
            for ferry in ferries:
                ferry.stop(ferry.proxy)
                ferry.stop(ferry.agent)

    def propagate(self, result: RowResult, folder: Path, pollers: list[Poller]) -> None:
        deny = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-http", "namespace": NAMESPACE},
            "spec": {
                "selector": {"matchLabels": dict(SELECTOR)},
                "action": "DENY",
                "rules": [{"to": [{"operation": {"ports": [str(HTTP_PORT)]}}]}],
            },
        }
        target = folder / "deny.yaml"
        tmp = folder / ".deny.yaml.tmp"
        for poller in pollers:  # no policy yet: allowed everywhere
            poller.until("allowed", time.monotonic(), 10.0)
        denies: list[dict[str, float]] = []
        allows: list[dict[str, float]] = []
        for change in range(self.opts.changes):
            tmp.write_text(yaml.safe_dump(deny, sort_keys=False))
            denies.append(self.change(pollers, "denied", lambda: tmp.replace(target)))
            log(
                f"propagation {change + 1}/{self.opts.changes}: DENY enforced after "
                + ", ".join(f"{k} {v:.0f} ms" for k, v in denies[-1].items())
            )
            time.sleep(0.5 + random.random() / 2)
            allows.append(self.change(pollers, "allowed", target.unlink))
            log(
                f"propagation {change + 1}/{self.opts.changes}: removal enforced after "
                + ", ".join(f"{k} {v:.0f} ms" for k, v in allows[-1].items())
            )
            time.sleep(0.5 + random.random() / 2)
        result.propagation = {"deny_ms": denies, "remove_ms": allows}

    @staticmethod
    def change(pollers: list[Poller], state: str, act: Callable[[], object]) -> dict[str, float]:
        """`act` (a file change), then the ms until every poller sees `state`; "both" is the
        later of them."""
        found: dict[str, float] = {}
        failures: list[str] = []

        def watch(poller: Poller, start: float) -> None:
            try:
                found[poller.label] = (poller.until(state, start, 10.0) - start) * 1e3
            except Exception as exc:
                failures.append(f"{poller.label}: {exc}")

        start = time.monotonic()
        act()
        threads = [threading.Thread(target=watch, args=(p, start)) for p in pollers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError("; ".join(failures))
        found["both"] = max(found.values())
        return found


class Poller:
    """Requests from inside a client pod (sockets made in its netns) to a server's /1k.bin, each
    on a new connection: "allowed" (200), "denied" (reset, closed without an answer, or 403)."""

    def __init__(self, netns_path: str, server_ip: str, label: str) -> None:
        self.netns_path = netns_path
        self.server_ip = server_ip
        self.label = label

    def probe(self) -> str:
        fd = os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with entered(fd):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            os.close(fd)
        sock.settimeout(2.0)
        try:
            sock.connect((self.server_ip, HTTP_PORT))
            sock.sendall(
                f"GET {PATH} HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n".encode()
            )
            data = sock.recv(64)
        except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
            return "denied"
        except OSError as exc:
            return f"error: {exc}"
        finally:
            sock.close()
        if data.startswith(b"HTTP/1.1 200"):
            return "allowed"
        if not data or data.startswith(b"HTTP/1.1 403"):
            return "denied"
        return f"error: {data[:40]!r}"

    def until(self, state: str, start: float, timeout: float) -> float:
        """Probe until one probe started after `start` answers `state`; when that probe ended."""
        last = ""
        while time.monotonic() - start < timeout:
            began = time.monotonic()
            last = self.probe()
            if last == state and began >= start:
                return time.monotonic()
            time.sleep(0.002)
        raise RuntimeError(f"not {state} after {timeout:g}s (last probe: {last})")


# --- report --------------------------------------------------------------------------------------


def _rps(run: Wrk | None) -> str:
    return "-" if run is None else f"{run.rps:,.0f}"


def _ratio(ferry: Wrk | None, envoy: Wrk | None) -> str:
    if ferry is None or envoy is None or not envoy.rps:
        return "-"
    return f"{ferry.rps / envoy.rps:.2f}x"


def _keepalive(r: RowResult, proxy: str) -> Wrk | None:
    best = r.best(proxy)
    return best.keepalive if best else None


def tables(bench: PolicyBench) -> str:
    rows = []
    for name in (p for p in bench.opts.paths if p in ROWS):
        r = bench.row(name)
        f, e = _keepalive(r, "ferry"), _keepalive(r, "envoy")
        label = LABELS[name] + (" (FAILED)" if r.error else "")
        rows.append(
            [
                label,
                _rps(f),
                latency(f.p50_us if f else None),
                latency(f.p99_us if f else None),
                _rps(e),
                latency(e.p50_us if e else None),
                latency(e.p99_us if e else None),
                _ratio(f, e),
            ]
        )
    header = [
        "row",
        "Ferry req/s",
        "Ferry p50",
        "Ferry p99",
        "Envoy req/s",
        "Envoy p50",
        "Envoy p99",
        "Ferry/Envoy",
    ]
    lines = markdown_table(header, rows) if rows else []
    close_rows = []
    for name in (p for p in bench.opts.paths if p in L4_ROWS):
        r = bench.row(name)
        f, e = r.best_close("ferry"), r.best_close("envoy")
        close_rows.append(
            [
                LABELS[name],
                _rps(f),
                latency(f.p99_us if f else None),
                _rps(e),
                latency(e.p99_us if e else None),
                _ratio(f, e),
            ]
        )
    if close_rows:
        lines += [
            "",
            "New connection per request (`Connection: close`, c=64): an L4 decision per request.",
            "",
        ]
        lines += markdown_table(
            ["row", "Ferry conn/s", "Ferry p99", "Envoy conn/s", "Envoy p99", "Ferry/Envoy"],
            close_rows,
        )
    many = bench.results.get("l4-1000")
    if many is not None:
        lines += ["", *paired_lines(many)]
    applies = [
        f"{name} {statistics.median(bench.row(name).apply_ms):,.0f} ms"
        for name in bench.opts.paths
        if name in ROWS and name != "none" and bench.row(name).apply_ms
    ]
    if applies:
        lines += ["", "Ferry, one node: the row's policy file renamed into the folder -> every "
                  "proxy worker on the new version (median of the phases; admin socket polled "
                  "every 50 ms): " + ", ".join(applies) + "."]  # fmt: skip
    propagation = bench.results.get("propagation")
    if propagation is not None and propagation.propagation:
        lines += ["", *propagation_lines(propagation.propagation)]
    return "\n".join(lines)


def _median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def propagation_lines(data: dict[str, Any]) -> list[str]:
    denies, removes = data["deny_ms"], data["remove_ms"]
    nodes = [k for k in denies[0] if k != "both"]
    header = ["file change -> enforced", *(f"node {n}" for n in nodes), "both nodes", "max"]
    rows = []
    for label, samples in (("DENY written", denies), ("DENY removed", removes)):
        cells = [f"{_median(samples, n):.0f} ms" for n in (*nodes, "both")]
        rows.append(
            [
                f"{label} (median of {len(samples)})",
                *cells,
                f"{max(s['both'] for s in samples):.0f} ms",
            ]
        )
    return markdown_table(header, rows)


def paired_lines(r: RowResult) -> list[str]:
    """Ferry with the 1,000 rules and without policy, back to back in each round."""
    parts = []
    for round_ in sorted({run.round for run in r.runs}):
        runs = {run.proxy: run for run in r.runs if run.round == round_}
        rules, none = runs.get("ferry"), runs.get(REFERENCE)
        if rules is None or none is None:
            continue
        text = (
            f"round {round_ + 1}: {rules.keepalive.rps:,.0f} vs {none.keepalive.rps:,.0f} req/s "
            f"({(1 - rules.keepalive.rps / none.keepalive.rps) * 100:+.1f} %)"
        )
        if rules.close is not None and none.close is not None:
            text += (
                f", close {rules.close.rps:,.0f} vs {none.close.rps:,.0f} conn/s "
                f"({(1 - rules.close.rps / none.close.rps) * 100:+.1f} %)"
            )
        parts.append(text)
    if not parts:
        return []
    return [
        "Ferry with the 1,000 L4 rules vs without policy, the two runs of a round back to back "
        "(cost in parentheses): " + "; ".join(parts) + "."
    ]


def paired_costs(r: RowResult, close: bool) -> list[float]:
    """Per round, 1 - (Ferry with the 1,000 rules) / (Ferry without policy, the run next to it)."""
    costs = []
    for round_ in sorted({run.round for run in r.runs}):
        runs = {run.proxy: run for run in r.runs if run.round == round_}
        rules, none = runs.get("ferry"), runs.get(REFERENCE)
        if rules is None or none is None:
            continue
        a, b = (rules.close, none.close) if close else (rules.keepalive, none.keepalive)
        if a is not None and b is not None and b.rps:
            costs.append(1 - a.rps / b.rps)
    return costs


def checks(bench: PolicyBench) -> list[Check]:
    out: list[Check] = []

    def kept(name: str, proxy: str, close: bool = False) -> Wrk | None:
        r = bench.results.get(name)
        if r is None or r.error:
            return None
        return r.best_close(proxy) if close else _keepalive(r, proxy)

    for close, what in (
        (False, "keep-alive c=64 req/s"),
        (True, "new connection per request, c=64 conn/s"),
    ):
        target = f"1,000 L4 rules cost <= 10 % against no policy ({what}, paired runs)"
        if "l4-1000" not in bench.opts.paths:
            continue
        r = bench.results.get("l4-1000")
        costs = [] if r is None or r.error else paired_costs(r, close)
        if not costs:
            out.append((target, None, "missing"))
            continue
        median = statistics.median(costs)
        detail = (
            f"median {median * 100:+.1f} % over {len(costs)} pair(s) ("
            + ", ".join(f"{c * 100:+.1f} %" for c in costs)
            + ")"
        )
        none, many = kept("none", "ferry", close), kept("l4-1000", "ferry", close)
        if none is not None and many is not None:
            detail += (
                f"; the table's rows (best runs, minutes apart): {many.rps:,.0f} vs "
                f"{none.rps:,.0f}, {(1 - many.rps / none.rps) * 100:+.1f} %"
            )
        out.append((target, median <= RULES_COST_TARGET, detail))
    for name in HTTP_ROWS:
        if name not in bench.opts.paths:
            continue
        target = f"Ferry >= Envoy req/s: {LABELS[name]}"
        f, e = kept(name, "ferry"), kept(name, "envoy")
        if f is None or e is None:
            out.append((target, None, "missing"))
            continue
        out.append(
            (
                target,
                f.rps >= e.rps,
                f"ferry {f.rps:,.0f} vs envoy {e.rps:,.0f} ({f.rps / e.rps:.2f}x)",
            )
        )
    if "propagation" in bench.opts.paths:
        target = "policy propagation <= 1 s (file change to enforcement on both nodes, median)"
        r = bench.results.get("propagation")
        if r is None or r.error or not r.propagation:
            out.append((target, None, "missing"))
        else:
            denies = r.propagation["deny_ms"]
            median = _median(denies, "both")
            out.append(
                (
                    target,
                    median <= PROPAGATION_TARGET_MS,
                    f"median {median:.0f} ms, max {max(s['both'] for s in denies):.0f} ms "
                    f"over {len(denies)} DENY writes",
                )
            )
    return out


def verified_lines(bench: PolicyBench) -> list[str]:
    lines = []
    for name in (p for p in bench.opts.paths if p in ROWS):
        r = bench.results.get(name)
        if r is None:
            continue
        for proxy in ("ferry", REFERENCE, "envoy"):
            checked = r.verified.get(proxy)
            runs = [run for run in r.runs if run.proxy == proxy]
            if not checked and not runs:
                continue
            counted = ""
            if runs:
                best = max(runs, key=lambda run: run.keepalive.rps)
                counted = "; counters over the best run: " + ", ".join(
                    f"{k} +{v:,}" for k, v in sorted(best.counters.items()) if v
                )
            lines.append(f"- {name} / {proxy}: " + "; ".join(checked or []) + counted)
    return lines


def report(bench: PolicyBench, elapsed: float) -> str:
    o = bench.opts
    commit = (git_commit() or "unknown")[:10]
    head = [
        f"## Ferry policy benchmark: {o.workers} proxy worker(s) = Envoy --concurrency, "
        f"wrk -t{THREADS} -c{CONNS} {o.duration:g}s keep-alive, best of {o.rounds} round(s), "
        f"JWT {o.jwt_alg}, {o.tokens:,} fresh tokens, commit {commit}",
        "",
    ]
    lines = [*head, tables(bench), "", *check_lines(checks(bench))]
    verified = verified_lines(bench)
    if verified:
        lines += ["", "Verified before measuring (and counted during the runs):", *verified]
    for name in o.paths:
        r = bench.results.get(name)
        if r is None:
            continue
        if r.error:
            lines.append(f"{name} failed: {r.error}")
        lines += [f"{name}: {note}" for note in r.notes]
    if bench.interrupted:
        lines.append("INTERRUPTED: the figures above are partial")
    lines.append(f"(total {elapsed:.0f}s)")
    return "\n".join(lines)


def to_json(bench: PolicyBench, elapsed: float) -> dict[str, Any]:
    return json_document(
        "ferry.bench.policy/v1",
        bench,
        elapsed,
        rows={name: dataclasses.asdict(r) for name, r in bench.results.items()},
        checks=checks_json(checks(bench)),
        interrupted=bench.interrupted,
    )


# --- entry point ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.policy", description=__doc__.split("\n")[0] if __doc__ else None
    )
    add_options(parser)
    add_paths(parser, NAMES)
    parser.add_argument("--rounds", type=int, default=None, help="Ferry/Envoy pairs per row (2)")
    parser.add_argument("--tokens", type=int, default=50_000, help="fresh JWT pool (50,000)")
    parser.add_argument("--jwt-alg", default="ES256", choices=("ES256", "RS256"))
    parser.add_argument("--changes", type=int, default=None, help="propagation changes (7)")
    args = parser.parse_args(argv)
    common = parse_options(parser, args, NAMES)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    changes = args.changes if args.changes is not None else (3 if args.quick else 7)
    if rounds < 1 or changes < 1 or common["duration"] <= 0:
        parser.error("--rounds and --changes must be at least 1, --duration positive")
    if args.tokens < 2 * JWT_CACHE:
        parser.error(f"--tokens must be at least {2 * JWT_CACHE:,} (twice the proxies' caches)")
    return Options(
        **common, rounds=rounds, tokens=args.tokens, jwt_alg=args.jwt_alg, changes=changes
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    status = preflight(envoy=any(p in ROWS for p in opts.paths))
    if status is not None:
        return status
    return execute(PolicyBench(opts), report, to_json, RESULTS)


if __name__ == "__main__":
    sys.exit(main())
