"""API security policy end to end: two simulated nodes, real clients, one policy folder.

One cluster serves the whole module (building it is most of the cost); every test writes the
policy it needs into the folder both agents watch (`Mesh.policies`, a fleet's central source)
and waits until both agents made a new version and every proxy worker of both nodes enforces
it (`apply`), so no test depends on what an earlier one left::

    node a (1 proxy worker)                      node b (2 proxy workers)
      client  shop/client   app=client             server    shop/server  app=api
      local   shop/local    app=api                          http echo 8080, tcp echo 9000,
              http echo 8080, tcp echo 9000                  gRPC 7443
      guest   guest/guest   app=guest              outsider  not enrolled: a plaintext client;
                                                             serves the JWKS on 8000

Policies select `app: api`: `local` (same-node traffic from client and guest) and `server`
(cross-node traffic over the mTLS tunnel, plaintext from outsider).  The clients are curl, a
gRPC client from grpcio and `policy_probe.py` (raw sockets, bursts, loops), all inside pods.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from agent.admin import request
from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes
from tests.run_id import SIM_PREFIX

PROBE = Path(__file__).with_name("policy_probe.py")
CLIENT = "cluster.local/ns/shop/sa/client"
ISSUER = "https://issuer.ferry.test"
API = {"app": "api"}
HTTP, TCP, GRPC, JWKS = 8080, 9000, 7443, 8000
Document = dict[str, Any]


@dataclass
class Cluster:
    mesh: Mesh
    a: FerryNode
    b: FerryNode
    client: Pod
    local: Pod
    guest: Pod
    server: Pod
    outsider: Pod
    jwks_dir: Path

    @property
    def nodes(self) -> tuple[FerryNode, FerryNode]:
        return self.a, self.b


def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll `check` until it returns something true (returned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting until {what}")


# ----------------------------------------------------------------------------------- policy
def agent_status(ferry: FerryNode) -> dict[str, Any]:
    """The agent's status straight from its admin socket (what `agent status` reads; fast
    enough to poll)."""
    reply: dict[str, Any] = request(ferry.state_dir / "agent.sock", {"op": "status"})
    return reply


def proxy_status(ferry: FerryNode) -> dict[str, Any]:
    reply: dict[str, Any] = request(ferry.state_dir / "proxy.sock", {"op": "status"})
    return reply


def enforced(ferry: FerryNode) -> int:
    """The agent's policy version if every proxy worker of the node enforces it, else -1."""
    version = int(agent_status(ferry)["policy"]["version"])
    applied = {w["policy_version"] for w in proxy_status(ferry)["applied"]}
    return version if applied == {version} else -1


def write_policy(c: Cluster, text: str, name: str = "policy.yaml") -> None:
    """Replace one file of the policy folder atomically (as an editor's save by rename does):
    one event, never a half-written file."""
    tmp = c.mesh.policies / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, c.mesh.policies / name)


def apply(c: Cluster, *documents: Document) -> None:
    """Make `documents` the whole policy and wait until every worker of both nodes enforces it."""
    before = [int(agent_status(n)["policy"]["version"]) for n in c.nodes]
    write_policy(c, yaml.safe_dump_all(documents))
    for ferry, old in zip(c.nodes, before, strict=True):

        def done(ferry: FerryNode = ferry, old: int = old) -> bool:
            policy = agent_status(ferry)["policy"]
            assert policy["rejected"] is None, policy["rejected"]
            return enforced(ferry) > old and policy["documents"] == len(documents)

        wait_until(done, f"{ferry.node.name} enforces the new policy")


def source(**fields: list[str]) -> Document:
    return {"from": [{"source": fields}]}


def operation(**fields: list[str]) -> Document:
    return {"to": [{"operation": fields}]}


def authz(name: str, action: str, *rules: Document) -> Document:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": API}, "action": action, "rules": list(rules)},
    }


EVERYONE = authz("everyone", "ALLOW", {})  # `rules: [{}]` matches every request
NO_CLIENT = authz("no-client", "DENY", source(principals=[CLIENT]))


def rate_limit(name: str, *rules: Document) -> Document:
    return {
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": API}, "rules": list(rules)},
    }


def request_authentication(uri: str, forward: bool = False) -> Document:
    rule: Document = {"issuer": ISSUER, "jwksUri": uri}
    if forward:
        rule["forwardOriginalToken"] = True
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "issuer", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": API}, "jwtRules": [rule]},
    }


# ---------------------------------------------------------------------------------- clients
def probe(pod: Pod, command: str, *args: str) -> Any:
    out = pod.exec([sys.executable, str(PROBE), command, *args], timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def start_probe(pod: Pod, command: str, *args: str, ready: str) -> subprocess.Popen[str]:
    """Start a long-running probe; return once it printed `ready`."""
    proc: subprocess.Popen[str] = pod.popen(
        [sys.executable, str(PROBE), command, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != ready:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"probe {command} said {line!r} instead of {ready!r}: {err}")
    return proc


def finish_probe(proc: subprocess.Popen[str]) -> Any:
    """Tell a long-running probe to finish (a line, then the end of its stdin); its result."""
    out, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out.splitlines()[-1])


def tcp(pod: Pod, *servers: Pod, v6: bool = False) -> list[str]:
    """One connection from `pod` to each server's echo port: "ok", "reset", ..."""
    return list(probe(pod, "tcp", *(f"{s.ip6 if v6 else s.ip4},{TCP}" for s in servers)))


def get(pod: Pod, url: str, *args: str) -> tuple[int, dict[str, str], str]:
    """curl `url` from `pod`: (status, headers by lower-case name, body); when curl fails,
    status 0 and its exit status and error as headers `curl-exit` and `curl-error`."""
    out = pod.curl(url, 5.0, ["-i", *args])
    if out.returncode != 0:
        return 0, {"curl-exit": str(out.returncode), "curl-error": out.stderr.strip()}, ""
    head, _, body = out.stdout.partition("\n\n")  # text mode: CRLF arrives as LF
    lines = head.split("\n")
    fields = (line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {name.lower(): value for name, value in fields}, body


def denials(ferry: FerryNode, pod: Pod, since: dict[str, int] | None = None) -> dict[str, int]:
    """`agent status`'s denial counts of one workload by reason; with `since` (an earlier
    reading) those counted after it."""
    now: dict[str, int] = ferry.workload(pod)["denied_by"]
    since = since or {}
    return {reason: n - since.get(reason, 0) for reason, n in now.items() if n != since.get(reason)}


def worker_pids(ferry: FerryNode) -> set[int]:
    assert ferry.proxy is not None
    return {child.pid for child in psutil.Process(ferry.proxy.pid).children()}


def serving_workers(ferry: FerryNode, pod: Pod, peer: Pod) -> set[int]:
    """The node's proxy workers holding a connection they accepted from `peer` in `pod`."""
    out = pod.exec(["ss", "-Htnp", "state", "established", "dst", peer.ip4]).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+),", out)} & worker_pids(ferry)


# --------------------------------------------------------------------------------- JWT keys
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64url(n), "e": b64url(e)}


def token(key: rsa.RSAPrivateKey, kid: str, ttl: int = 600) -> str:
    """An RS256 JWT from `ISSUER` for subject alice, expiring `ttl` seconds from now."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    claims = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + ttl}
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def bearer(jwt: str) -> tuple[str, str]:
    return "-H", f"Authorization: Bearer {jwt}"


def serve_jwks(c: Cluster, *keys: dict[str, str]) -> None:
    """What the identity provider pod serves at /jwks.json from now on."""
    tmp = c.jwks_dir / ".jwks.json.tmp"
    tmp.write_text(json.dumps({"keys": list(keys)}))
    os.replace(tmp, c.jwks_dir / "jwks.json")


# ---------------------------------------------------------------------------------- cluster
def _serve(pod: Pod, what: str, port: int, argv: list[str]) -> None:
    log = pod.node.tmpdir / "logs" / f"{pod.name}-{what}-{port}.log"
    with open(log, "wb") as out:
        proc = pod.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    pod.wait_listening(port, proc=proc, log=log)


@pytest.fixture(scope="module")
def cluster(sim_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("policy")
    nodes: list[SimNode] = []
    try:
        nodes += [SimNode(SIM_PREFIX), SimNode(SIM_PREFIX)]
        node_a, node_b = nodes
        link_nodes(node_a, node_b)
        mesh = Mesh(workdir)
        mesh.policies.mkdir()
        config: dict[str, Any] = {"policy": {"jwks_refresh": 1.0}}  # default 20 min
        a = mesh.add(node_a, workers=1, config=config)
        b = mesh.add(node_b, workers=2, config=config)
        client, local, guest = (node_a.add_pod(name) for name in ("client", "local", "guest"))
        server, outsider = node_b.add_pod("server"), node_b.add_pod("outsider")
        for pod in (local, server):
            pod.start_http_server(HTTP)
            pod.start_tcp_echo_server(TCP)
        _serve(server, "grpc", GRPC, [sys.executable, str(PROBE), "grpc-server", f"[::]:{GRPC}"])
        jwks_dir = workdir / "jwks"
        jwks_dir.mkdir()
        (jwks_dir / "jwks.json").write_text('{"keys": []}')
        http_server = [sys.executable, "-m", "http.server", "--directory", str(jwks_dir)]
        _serve(outsider, "jwks", JWKS, [*http_server, "--bind", outsider.ip4, str(JWKS)])
        for ferry in (a, b):
            ferry.start()
        a.enroll(client, "shop", "client", {"app": "client"})
        a.enroll(local, "shop", "local", API)
        a.enroll(guest, "guest", "guest", {"app": "guest"})
        b.enroll(server, "shop", "server", API)
        mesh.wait_directory(entries=8)  # four enrolled pods, v4 and v6 each
        yield Cluster(mesh, a, b, client, local, guest, server, outsider, jwks_dir)
    finally:
        errors = []
        for node in reversed(nodes):
            try:
                node.teardown()
            except Exception as exc:
                errors.append(str(exc))
        assert not errors, errors


def ferry_logs(c: Cluster) -> list[Path]:
    return [n.logs / name for n in c.nodes for name in ("run.log", "proxy.log")]


@pytest.fixture
def c(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The shared cluster.  After the test: no agent, proxy or worker crashed meanwhile (a
    traceback or a restarted worker in their logs); after a failure, the nodes' logs."""
    failed = request.session.testsfailed
    sizes = {log: log.stat().st_size for log in ferry_logs(cluster)}
    yield cluster
    if request.session.testsfailed > failed:
        print(cluster.a.log_text()[-30000:], cluster.b.log_text()[-30000:])
    for log, size in sizes.items():
        with open(log, errors="replace") as text:
            text.seek(size)
            new = text.read()
        assert "Traceback" not in new and "exited; restarting" not in new, f"{log}:\n{new}"


# ------------------------------------------------------------------------------------ tests
def test_principals_are_allowed_and_denied_cross_node_and_same_node(c: Cluster) -> None:
    before_b, before_a = denials(c.b, c.server), denials(c.a, c.local)
    apply(c, authz("clients-only", "ALLOW", source(principals=[CLIENT])))
    assert tcp(c.client, c.server, c.local) == ["ok", "ok"]  # cross-node mTLS, same node
    assert tcp(c.guest, c.server, c.local) == ["reset", "reset"]  # L4 denials are resets
    assert tcp(c.outsider, c.server) == ["reset"]  # plaintext: no principal at all
    assert c.client.fetch_json(f"http://{c.server.ip4}:{HTTP}/")["peer"] == c.client.ip4
    refused = get(c.guest, f"http://{c.server.ip4}:{HTTP}/")  # reset while connecting or after
    assert refused[1].get("curl-exit") in ("7", "56"), refused
    assert denials(c.b, c.server, before_b) == {"policy_denied": 3}  # as `agent status` shows
    assert denials(c.a, c.local, before_a) == {"policy_denied": 1}
    assert c.b.workload(c.server)["policies"] == ["AuthorizationPolicy shop/clients-only"]
    assert c.a.workload(c.local)["labels"] == API


def test_namespaces_deny_before_allow(c: Cluster) -> None:
    apply(c, EVERYONE, authz("no-guests", "DENY", source(namespaces=["guest"])))
    assert tcp(c.guest, c.server, c.local) == ["reset", "reset"]
    assert tcp(c.client, c.server, c.local) == ["ok", "ok"]
    assert tcp(c.outsider, c.server) == ["ok"]  # plaintext has no namespace to match


def test_ip_blocks_cross_node_same_node_and_plaintext(c: Cluster) -> None:
    blocks = [f"{c.client.ip4}/32", f"{c.outsider.ip4}/32"]
    apply(c, authz("by-address", "ALLOW", source(ipBlocks=blocks)))
    assert tcp(c.client, c.server, c.local) == ["ok", "ok"]  # the tunnel keeps the source IP
    assert tcp(c.outsider, c.server) == ["ok"]
    assert tcp(c.guest, c.server, c.local) == ["reset", "reset"]
    assert tcp(c.client, c.server, c.local, v6=True) == ["reset", "reset"]  # not in the blocks


def test_method_and_path_rules_answer_403_naming_the_policy(c: Cluster) -> None:
    apply(
        c,
        authz("reads", "ALLOW", operation(methods=["GET"], paths=["/public/*"])),
        authz("no-admin", "DENY", operation(paths=["/public/admin*"])),
    )
    tag = secrets.token_hex(4)
    for client, destination in ((c.client, c.server), (c.client, c.local), (c.outsider, c.server)):
        base = f"http://{destination.ip4}:{HTTP}"
        assert get(client, f"{base}/public/{tag}")[0] == 200
        status, headers, _ = get(client, f"{base}/public/admin-{tag}")
        assert (status, headers.get("x-ferry-denied-by")) == (403, "shop/no-admin"), headers
        status, headers, _ = get(client, f"{base}/public/post-{tag}", "-X", "POST")
        assert (status, headers.get("x-ferry-denied-by")) == (403, "shop/reads")  # no rule of it
        assert get(client, f"{base}/private-{tag}")[0] == 403
    for destination in (c.server, c.local):
        seen = {s["path"] for s in destination.seen("http", HTTP) if tag in s["path"]}
        assert seen == {f"/public/{tag}"}  # denied requests never reached the app


def test_jwt_with_keys_from_a_jwks_uri_served_by_a_pod_and_rotated(c: Cluster) -> None:
    first, second = new_key(), new_key()
    serve_jwks(c, jwk(first, "one"))
    uri = f"http://{c.outsider.ip4}:{JWKS}/jwks.json"
    needs_token = authz("token-needed", "ALLOW", source(requestPrincipals=["*"]))
    agents = [agent_status(n)["pid"] for n in c.nodes]
    apply(c, request_authentication(uri), needs_token)
    for ferry in c.nodes:  # each agent fetched the keys from the pod and inlined them
        assert agent_status(ferry)["policy"]["jwks"][uri]["keys"] == 1
    valid = token(first, "one")
    for destination in (c.server, c.local):
        url = f"http://{destination.ip4}:{HTTP}/jwt"
        assert get(c.client, url)[0] == 403  # no token: no request principal
        status, _, body = get(c.client, url, *bearer(valid))
        assert status == 200
        seen = json.loads(body)  # what the app got
        assert seen["peer"] == c.client.ip4 and seen["path"] == "/jwt"
        assert "authorization" not in {name.lower() for name in seen["headers"]}
        status, headers, _ = get(c.client, url, *bearer(token(first, "one", ttl=-3600)))
        assert status == 401 and headers["www-authenticate"].startswith("Bearer "), headers
        assert get(c.client, url, *bearer(token(second, "one")))[0] == 401  # forged
    # the identity provider rotates its key: both agents pick it up without a restart
    serve_jwks(c, jwk(second, "two"))
    rotated = token(second, "two")
    for destination in (c.server, c.local):
        url = f"http://{destination.ip4}:{HTTP}/jwt"

        def passes(url: str = url) -> bool:
            return get(c.client, url, *bearer(rotated))[0] == 200

        wait_until(passes, f"{destination.name}'s node verifies with the new key")
        assert get(c.client, url, *bearer(valid))[0] == 401  # the retired key is gone
    assert [agent_status(n)["pid"] for n in c.nodes] == agents
    # forwardOriginalToken: the app gets the token as sent
    apply(c, request_authentication(uri, forward=True), needs_token)
    status, _, body = get(c.client, f"http://{c.server.ip4}:{HTTP}/jwt", *bearer(rotated))
    assert status == 200
    assert json.loads(body)["headers"].get("Authorization") == f"Bearer {rotated}"


def test_rate_limits_are_exact_across_two_workers_and_refill(c: Cluster) -> None:
    burst = {
        "match": {"ports": [HTTP], "paths": ["/burst/*"]},
        "bucket": {"maxTokens": 10, "tokensPerFill": 1, "fillInterval": "1h"},
    }
    refill = {"match": {"ports": [HTTP], "paths": ["/refill/*"]}, "key": "source.ip",
              "bucket": {"maxTokens": 2, "tokensPerFill": 1, "fillInterval": "1s"}}  # fmt: skip
    apply(c, rate_limit("burst", burst, refill))
    # 40 connections of a plaintext client on node b, spread over both of its workers
    args = ("burst", c.server.ip4, str(HTTP), "/burst/x", "40")
    clients = start_probe(c.outsider, *args, ready="open")
    assert len(serving_workers(c.b, c.server, c.outsider)) == 2
    answers = finish_probe(clients)
    codes = collections.Counter(status for status, _ in answers)
    assert codes == {"200": 10, "429": 30}, codes
    limited = next(headers for status, headers in answers if status == "429")
    assert limited["x-ferry-denied-by"] == "shop/burst"
    assert limited["x-ratelimit-limit"] == "10" and limited["x-ratelimit-remaining"] == "0"
    assert float(limited["retry-after"]) > 3000 and float(limited["x-ratelimit-reset"]) > 0
    # key none: one bucket for the workload, whoever asks; tunnelled requests find it empty
    assert get(c.client, f"http://{c.server.ip4}:{HTTP}/burst/y")[0] == 429
    # key source.ip: 2 at once, then 1 a second
    url = f"http://{c.server.ip4}:{HTTP}/refill/x"
    nothing = ("-o", "/dev/null")
    out = c.client.curl(url, args=["-w", "%{http_code} ", *nothing, url, *nothing, url, *nothing])
    assert out.stdout.split() == ["200", "200", "429"], out.stdout
    status, headers, _ = get(c.client, url)
    assert status == 429 and 0 < float(headers["retry-after"]) <= 1, headers
    time.sleep(float(headers["retry-after"]))
    assert get(c.client, url)[0] == 200  # refilled
    assert get(c.outsider, url)[0] == 200  # another address, another bucket


def test_grpc_methods_denied_and_allowed_per_call(c: Cluster) -> None:
    apply(c, authz("grpc-reads", "ALLOW", operation(ports=[str(GRPC)], paths=["/shop.Api/Get"])))
    calls = probe(c.client, "grpc", f"{c.server.ip4}:{GRPC}", "Get", "Delete", "Get")
    assert calls == ["Get ok:x", "Delete PERMISSION_DENIED RBAC: access denied", "Get ok:x"]
    workloads = proxy_status(c.b)["workloads"].values()
    server = next(w for w in workloads if w["name"] == c.server.netns)
    allowed = [d for d in server["decisions"] if d["policy"] == "shop/grpc-reads"]
    assert [(d["decision"], d["count"]) for d in allowed] == [("allow", 2)], server["decisions"]


def test_policy_edited_under_load_fails_no_allowed_request(c: Cluster) -> None:
    def version(i: int) -> list[Document]:
        return [
            authz("load", "ALLOW", operation(methods=["GET"], paths=["/load/*", f"/v{i}/*"])),
            authz("never", "DENY", operation(paths=[f"/never/{i}"])),
        ]

    apply(c, *version(0))
    urls = [f"http://{d.ip4}:{HTTP}/load/{n}" for d in (c.server, c.local) for n in "ab"]
    load = start_probe(c.client, "load", *urls, ready="started")
    try:
        for i in range(1, 6):
            apply(c, *version(i))  # each in force on both nodes before the next
            allowed = get(c.client, f"http://{c.server.ip4}:{HTTP}/v{i}/x")
            assert allowed[0] == 200, allowed
            denied = get(c.client, f"http://{c.local.ip4}:{HTTP}/never/{i}")
            assert denied[0] == 403, denied
    finally:
        result = finish_probe(load)
    print(f"{result['ok']} requests under 6 policy versions")
    assert result["failed"] == [] and result["ok"] > 50, result


def test_a_connection_the_new_policy_denies_is_closed_within_a_second(c: Cluster) -> None:
    apply(c, EVERYONE)
    revoked = [f"{c.server.ip4},{TCP}", f"{c.local.ip4},{TCP}"]  # cross-node and same node
    client = start_probe(c.client, "hold", *revoked, ready="ready")
    outsider = start_probe(c.outsider, "hold", f"{c.server.ip4},{TCP}", ready="ready")
    try:
        changed = time.time()
        apply(c, NO_CLIENT)
        time.sleep(max(0.0, changed + 1.2 - time.time()))  # the probes note when they close
    finally:
        closed, kept = finish_probe(client), finish_probe(outsider)
    print(f"revoked after {[round(closed[t]['closed_at'] - changed, 3) for t in revoked]} s")
    for target in revoked:
        assert closed[target]["how"] in ("reset", "eof"), closed
        assert closed[target]["closed_at"] - changed <= 1.0, closed
    assert kept[f"{c.server.ip4},{TCP}"] == {"closed_at": None, "how": "", "echo_after": True}


def test_propagation_from_file_change_to_enforcement_on_both_nodes(c: Cluster) -> None:
    """Both agents watch the one folder: from the file's rename to the first connection
    refused by each node's proxy (node b serves `server`, node a `local`) takes <= 1 s."""
    apply(c, EVERYONE)
    targets = [f"{c.server.ip4},{TCP}", f"{c.local.ip4},{TCP}"]
    watch = start_probe(c.client, "watch", *targets, ready="ready")
    changed = time.time()
    write_policy(c, yaml.safe_dump(NO_CLIENT))
    refused = finish_probe(watch)
    delays = {t: round(refused[t] - changed, 3) for t in targets if refused[t] is not None}
    print(f"policy propagation, file change to enforcement: {delays} (node b, node a)")
    assert len(delays) == 2 and max(delays.values()) <= 1.0, delays


def test_an_invalid_file_is_rejected_and_the_last_good_policy_stays(c: Cluster) -> None:
    apply(c, authz("no-admin", "DENY", operation(paths=["/admin*"])))
    versions = [enforced(n) for n in c.nodes]
    broken = c.mesh.policies / "broken.yaml"
    try:
        write_policy(c, yaml.safe_dump(authz("broken", "DENY", operation(methodz=["GET"]))),
                     broken.name)  # fmt: skip
        for ferry in c.nodes:  # `agent status` names the file, document, field and reason

            def rejected(ferry: FerryNode = ferry) -> Any:
                return ferry.status()["agent"]["policy"]["rejected"]

            [error] = wait_until(rejected, f"{ferry.node.name} rejects the change")["errors"]
            where = f"{broken}: AuthorizationPolicy shop/broken: spec.rules[0].to[0].operation: "
            assert error.startswith(where) and "'methodz' was unexpected" in error, error
        assert [enforced(n) for n in c.nodes] == versions  # nothing was pushed
        base = f"http://{c.server.ip4}:{HTTP}"
        assert get(c.client, f"{base}/admin")[0] == 403  # the old policy keeps working
        assert get(c.client, f"{base}/other", "-X", "DELETE")[0] == 200
        # fixed: applied, with the document that stayed in force
        write_policy(c, yaml.safe_dump(authz("broken", "DENY", operation(methods=["DELETE"]))),
                     broken.name)  # fmt: skip
        for ferry, old in zip(c.nodes, versions, strict=True):

            def fixed(ferry: FerryNode = ferry, old: int = old) -> bool:
                policy = agent_status(ferry)["policy"]
                return policy["rejected"] is None and enforced(ferry) > old

            wait_until(fixed, f"{ferry.node.name} applies the fix")
            assert agent_status(ferry)["policy"]["documents"] == 2
        assert get(c.client, f"{base}/other", "-X", "DELETE")[0] == 403
        assert get(c.client, f"{base}/admin")[0] == 403
    finally:
        broken.unlink(missing_ok=True)


def test_a_non_http_connection_on_an_http_inspected_port_is_revoked_too(c: Cluster) -> None:
    # the second rule needs request facts on the echo port: its connections are inspected, and
    # bytes that are not HTTP get the L4 decision (the first rule allows them)
    apply(c, authz("everyone", "ALLOW", {}, operation(ports=[str(TCP)], paths=["/x"])))
    revoked = [f"{c.server.ip4},{TCP}", f"{c.local.ip4},{TCP}"]
    client = start_probe(c.client, "hold", *revoked, ready="ready")
    try:
        changed = time.time()
        apply(c, NO_CLIENT)
        time.sleep(max(0.0, changed + 1.2 - time.time()))
    finally:
        closed = finish_probe(client)
    for target in revoked:
        assert closed[target]["how"] in ("reset", "eof"), closed
        assert closed[target]["closed_at"] - changed <= 1.0, closed
