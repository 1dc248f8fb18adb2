"""A real worker enforcing policy on real redirected traffic between two throwaway namespaces.

    client netns (10.78.0.1/30)  <--veth-->  server netns (10.78.0.2/30)

The server namespace is enrolled with the production rules; one worker serves it as workload
`server` (namespace `shop`, label `app: api`).  Policies go to the worker as the supervisor
sends them (`UpdatePolicy` slices of the PolicySet JSON), and curl in the client namespace is the
real client.  Checked: an L4 DENY resets the connection; HTTP rules decide per request (403
with `x-ferry-denied-by`, the rest through to the app, keep-alive and pipelining included);
non-HTTP traffic on a port with HTTP rules gets the L4 decision; a rate limit answers 429 with
its headers; a new policy closes a connection it no longer allows; the counters say why.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import PolicyConfig, ProxyConfig, RedirectionConfig
from agent.netns import entered

from .netns_pair import (
    HTTP_PORT,
    NetnsPair,
    curl,
    needs_netns,
    send_policy,
    stats,
    wait_port,
    wait_stats,
)

CLIENT_IP = "10.78.0.1"
SERVER_IP = "10.78.0.2"
ECHO_PORT = 7007

pytestmark = needs_netns

DENY_CLIENT = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-client, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: ["{CLIENT_IP}/32"]}}}}]}}]
"""

HTTP_RULES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: paths, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: ["GET"], paths: ["/public*"], ports: ["{HTTP_PORT}"]}}}}]
  - to: [{{operation: {{ports: ["{ECHO_PORT}"]}}}}]
"""

RATE_LIMIT = f"""
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: burst, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - match: {{ports: [{HTTP_PORT}], paths: ["/*"]}}
    key: source.ip
    bucket: {{maxTokens: 3, tokensPerFill: 1, fillInterval: 1m}}
"""


class Env(NetnsPair):
    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, ("c", "s"), (CLIENT_IP, SERVER_IP), RedirectionConfig(ipv6=False),
                         ProxyConfig(connect_timeout=2.0, idle_timeout=30.0))  # fmt: skip
        self.client, self.server = self.names
        self.client_fd, self.server_fd = self.netns_fds

    def policed(self, policy: PolicyConfig | None = None) -> socket.socket:
        self.enroll(self.server)
        ctl = self.start_worker("--worker-id", "3", policy=policy)
        self.add_workload(ctl, "server", self.server_fd, ips=(SERVER_IP,), namespace="shop",
                          labels={"app": "api"})  # fmt: skip
        return ctl

    def echo_server(self) -> socket.socket:
        with entered(self.server_fd):
            srv = socket.create_server((SERVER_IP, ECHO_PORT))
        srv.settimeout(5)
        return srv

    def connect(self, port: int) -> socket.socket:
        with entered(self.client_fd):
            cli = socket.socket()
        cli.settimeout(5)
        cli.connect((SERVER_IP, port))
        return cli


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with Env(tmp_path) as e:
        yield e


def denied(s: object, uid: str, reason: str) -> int:
    return sum(f.denied.get(reason, 0) for f in s.flows.get(uid, ()))  # type: ignore[attr-defined]


def test_an_l4_deny_resets_the_connection(env: Env) -> None:
    ctl = env.policed()
    env.http_server()
    assert curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/x").returncode == 0  # no policy yet
    send_policy(ctl, 1, DENY_CLIENT)
    out = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/x")
    assert out.returncode in (7, 56), out.stderr  # refused or reset: the RST comes at once
    s = wait_stats(ctl, lambda s: denied(s, "server", "policy_denied") == 1)
    assert s.applied.policy_version == 1
    assert any(d.policy == "shop/no-client" and d.decision == "deny"
               for d in s.decisions["server"])  # fmt: skip


def test_http_rules_decide_each_request(env: Env) -> None:
    ctl = env.policed()
    env.http_server()
    send_policy(ctl, 1, HTTP_RULES)
    ok = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/public/a")
    assert ok.returncode == 0 and ok.stdout == CLIENT_IP, ok.stderr
    no = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/admin", "-i")
    assert no.returncode == 0
    assert no.stdout.startswith("HTTP/1.1 403 Forbidden")
    assert "x-ferry-denied-by: shop/paths" in no.stdout  # the ALLOW policy nothing matched
    post = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/public/a", "-X", "POST", "-i")
    assert post.stdout.startswith("HTTP/1.1 403")
    # dot segments are normalized before the decision: /public/../admin is /admin
    sneaky = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/public/%2e%2e/admin",
                  "-i", "--path-as-is")  # fmt: skip
    assert sneaky.stdout.startswith("HTTP/1.1 403"), sneaky.stdout
    wait_stats(ctl, lambda s: denied(s, "server", "policy_denied") == 3)


def test_the_backend_gets_the_path_policy_decided_on(env: Env) -> None:
    ctl = env.policed()
    send_policy(
        ctl,
        1,
        HTTP_RULES.replace(
            f'ports: ["{ECHO_PORT}"]', f'paths: ["/public/*"], ports: ["{ECHO_PORT}"]'
        ),
    )
    srv = env.echo_server()
    with srv, env.connect(ECHO_PORT) as cli:
        cli.sendall(b"GET /secret/%2e%2e/public/a?next=/../x HTTP/1.1\r\nHost: api\r\n\r\n")
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(1000).split(b"\r\n")[0] == b"GET /public/a?next=/../x HTTP/1.1"


def test_keep_alive_requests_are_decided_one_by_one(env: Env) -> None:
    ctl = env.policed()
    env.http_server()
    send_policy(ctl, 1, HTTP_RULES)
    cli = env.connect(HTTP_PORT)
    with cli:
        host = f"Host: {SERVER_IP}\r\n"
        cli.sendall(f"GET /public/1 HTTP/1.1\r\n{host}\r\nGET /public/2 HTTP/1.1\r\n{host}\r\n"
                    f"GET /secret HTTP/1.1\r\n{host}\r\n".encode())  # fmt: skip
        answer = b""
        while chunk := cli.recv(65536):
            answer += chunk
    text = answer.decode()
    assert text.count("HTTP/1.1 200") == 2 and text.count("HTTP/1.1 403") == 1
    assert text.index("403") > text.rindex("200")  # answered in order, then closed
    stats(ctl)


def test_non_http_traffic_on_a_port_with_http_rules_gets_the_l4_decision(env: Env) -> None:
    ctl = env.policed()
    send_policy(ctl, 1, HTTP_RULES)
    srv = env.echo_server()
    with srv:
        cli = env.connect(ECHO_PORT)  # the ALLOW rule for this port has no HTTP field
        with cli:
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"\x00\x01binary")
                assert conn.recv(100) == b"\x00\x01binary"
    # port 8080's only rule needs HTTP: binary traffic there matches no ALLOW rule at L4
    env.http_server()
    cli = env.connect(HTTP_PORT)
    with cli:
        cli.sendall(b"\x16\x03\x01 not http at all")
        with pytest.raises(ConnectionResetError):
            cli.recv(100)
    wait_stats(ctl, lambda s: denied(s, "server", "policy_denied") >= 1)


def test_a_connection_closed_before_a_byte_is_no_denial(env: Env) -> None:
    ctl = env.policed()
    env.http_server()
    send_policy(ctl, 1, HTTP_RULES)
    for _ in range(3):
        env.connect(HTTP_PORT).close()  # a health check's connect, or wrk ending
    assert curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/public/a").returncode == 0
    s = wait_stats(ctl, lambda s: s.totals("server", "inbound")["connections_closed"] >= 4)
    assert denied(s, "server", "policy_denied") == 0
    assert not any(d.decision == "deny" for d in s.decisions.get("server", ()))


def test_a_rate_limit_answers_429_with_its_headers(env: Env) -> None:
    ctl = env.policed()
    env.http_server()
    send_policy(ctl, 1, RATE_LIMIT)
    codes = []
    for _ in range(5):
        out = curl(env.client, f"http://{SERVER_IP}:{HTTP_PORT}/x", "-i")
        codes.append(out.stdout.split(" ", 2)[1])
        last = out.stdout
    assert codes == ["200", "200", "200", "429", "429"], codes
    assert "retry-after: " in last and "x-ratelimit-limit: 3" in last
    assert "x-ratelimit-remaining: 0" in last and "x-ferry-denied-by: shop/burst" in last
    wait_stats(ctl, lambda s: denied(s, "server", "rate_limited") == 2)


def test_a_global_rate_limit_is_shared_by_the_nodes_through_redis(env: Env, redis: str) -> None:
    config = PolicyConfig(redis=redis)
    limit = RATE_LIMIT.replace("key: source.ip", "key: source.ip\n    scope: global")
    url = f"http://{SERVER_IP}:{HTTP_PORT}/x"
    env.http_server()
    codes = []
    for _node in ("a", "b"):  # a proxy each, with its own node buckets: one after the other
        ctl = env.policed(config)
        worker = env.procs[-1]
        send_policy(ctl, 1, limit)
        codes += [curl(env.client, url, "-i").stdout.split(" ", 2)[1] for _ in range(2)]
        ctl.close()  # the worker exits at EOF and its listeners close with it
        worker.wait(10)
    assert codes == ["200", "200", "200", "429"], codes  # maxTokens 3 across both nodes


def test_a_new_policy_closes_connections_it_no_longer_allows(env: Env) -> None:
    ctl = env.policed()
    srv = env.echo_server()
    with srv:
        cli = env.connect(ECHO_PORT)
        with cli:
            conn, _ = srv.accept()
            with conn:
                cli.sendall(b"hello")
                assert conn.recv(100) == b"hello"
                started = time.monotonic()
                send_policy(ctl, 1, DENY_CLIENT)
                with pytest.raises(ConnectionResetError):
                    cli.sendall(b"again")
                    cli.recv(100)
                assert time.monotonic() - started < 1.0
    stats(ctl)


def test_a_spliced_connection_to_a_port_that_now_needs_http_is_closed_gracefully(
    env: Env,
) -> None:
    ctl = env.policed()
    send_policy(ctl, 1, HTTP_RULES.replace(f"{HTTP_PORT}", "1"))  # the echo port: L4 only
    srv = env.echo_server()
    with srv, env.connect(ECHO_PORT) as cli:
        conn, _ = srv.accept()
        with conn:
            cli.sendall(b"GET /public/a HTTP/1.1\r\n\r\n")  # spliced: never parsed
            assert conn.recv(100).startswith(b"GET /public/a")
            started = time.monotonic()
            send_policy(ctl, 2, HTTP_RULES.replace(f'ports: ["{ECHO_PORT}"]', 'paths: ["/x"]'))
            assert cli.recv(100) == b""  # a FIN, not a reset: a keep-alive client reconnects
            assert time.monotonic() - started < 1.0
    assert denied(stats(ctl), "server", "policy_revoked") == 1


GRPC_PORT = 7443
GRPC_SERVER = """
import sys
from concurrent import futures
import grpc

def answer(request, context):
    return b"ok:" + request

handler = grpc.method_handlers_generic_handler("shop.Api", {
    name: grpc.unary_unary_rpc_method_handler(answer)  # bytes in, bytes out: no protobuf
    for name in ("Get", "Delete")
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1])
server.start()
server.wait_for_termination()
"""

GRPC_CLIENT = """
import sys
import grpc

channel = grpc.insecure_channel(sys.argv[1])
for method in sys.argv[2:]:
    call = channel.unary_unary(f"/shop.Api/{method}")
    try:
        print(method, call(b"x", timeout=5).decode())
    except grpc.RpcError as exc:
        print(method, exc.code().name, exc.details())
"""

GRPC_POLICY = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reads, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules: [{{to: [{{operation: {{ports: ["{GRPC_PORT}"], paths: ["/shop.Api/Get"]}}}}]}}]
"""


def test_grpc_calls_are_decided_one_by_one(env: Env) -> None:
    """A real gRPC client and server (grpcio, HTTP/2 with prior knowledge) through the proxy:
    the allowed method reaches the app, the denied one is answered PERMISSION_DENIED (7)."""
    ctl = env.policed()
    send_policy(ctl, 1, GRPC_POLICY)
    server, client = env.tmp / "grpc_server.py", env.tmp / "grpc_client.py"
    server.write_text(GRPC_SERVER)
    client.write_text(GRPC_CLIENT)
    env.spawn(env.server, sys.executable, str(server), f"{SERVER_IP}:{GRPC_PORT}")
    wait_port(env.server_fd, (SERVER_IP, GRPC_PORT), env.redirection.mark)
    out = subprocess.run(
        ["ip", "netns", "exec", env.client, sys.executable, str(client),
         f"{SERVER_IP}:{GRPC_PORT}", "Get", "Delete", "Get"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.stdout.splitlines() == [
        "Get ok:x",
        "Delete PERMISSION_DENIED RBAC: access denied",
        "Get ok:x",
    ], out.stderr
    s = wait_stats(ctl, lambda s: denied(s, "server", "policy_denied") == 1)
    assert sum(d.count for d in s.decisions["server"] if d.decision == "allow") == 2
