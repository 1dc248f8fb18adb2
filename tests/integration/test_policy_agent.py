"""Policy in a real `agent run`: labels, the watched directory, JWKS, `agent policy check`, status.

A throwaway node as in test_enrollment_safety (the agent runs in its own network namespace, with
its state dir, config and policy directory in the test's temporary directory), one enrolled pod
with labels, and the operator's commands run as an operator runs them.  The JWKS endpoint is a
real HTTP server started inside the node's namespace (the only place the agent can reach).  No
proxy runs: these are the agent's decisions (`agent policy check` asks the agent, which compiles
the policy in force for the pod's namespace and labels).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.admin import request
from tests.integration.test_enrollment_safety import Node, ferry_rules
from tests.unit.jwks_server import ec_key, jwks, token

ISSUER = "https://idp.example"
JWKS_PORT = 18080
KEY = ec_key()


def allow(methods: str) -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-allow, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/web]}}}}]
    to: [{{operation: {{methods: [{methods}]}}}}]
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]
"""


REQUEST_AUTHENTICATION = f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: api-jwt, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  jwtRules:
  - issuer: {ISSUER}
    jwksUri: http://127.0.0.1:{JWKS_PORT}/jwks.json
"""

INVALID = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec:
  rules: [{from: [{source: {notPrinciple: [x]}}]}]
"""


class PolicyNode(Node):
    def __init__(self, workdir: Path) -> None:
        self.policies = workdir / "policies"
        self.jwks_dir = workdir / "idp"
        super().__init__(workdir)
        self.policies.mkdir()
        self.jwks_dir.mkdir()
        self.idp: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    def configure(self, **settings: Any) -> None:
        settings.setdefault("policy", {"directory": str(self.policies), "jwks_refresh": 1})
        super().configure(**settings)

    def serve_jwks(self) -> None:
        """The identity provider's JWKS endpoint, inside the node (where the agent is)."""
        self.idp = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "http.server", "--bind",
             "127.0.0.1", "--directory", str(self.jwks_dir), str(JWKS_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def start_proxy(self, workers: int = 2) -> None:
        with open(self.log, "ab") as log:
            self.proxy = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *self.argv("proxy", "--config",
                 str(self.config), "--workers", str(workers))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait(lambda: self.proxy_status().get("agent_connected", False), "the proxy")

    def proxy_status(self) -> dict[str, Any]:
        try:
            return request(self.state_dir / "proxy.sock", {"op": "status"}, timeout=5.0)
        except OSError:
            return {}

    def enforced(self) -> list[int]:
        """The policy version every proxy worker enforces."""
        return [a["policy_version"] for a in self.proxy_status().get("applied", [])]

    def status(self) -> dict[str, Any]:
        reply = request(self.state_dir / "agent.sock", {"op": "status"})
        assert reply["ok"], reply
        policy: dict[str, Any] = reply["policy"]
        return policy

    def check(self, pod: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("policy", "check", pod, *args)

    def teardown(self) -> None:
        if self.proxy is not None:
            self.proxy.terminate()
            self.proxy.wait(10)
        if self.idp is not None:
            self.idp.kill()
            self.idp.wait()
        super().teardown()


@pytest.fixture
def node(privileged: None, tmp_path: Path) -> Iterator[PolicyNode]:
    made = PolicyNode(tmp_path)
    try:
        yield made
    finally:
        made.teardown()


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def bearer(sub: str) -> str:
    now = int(time.time())
    return token(KEY, {"iss": ISSUER, "sub": sub, "iat": now, "exp": now + 600})


def test_policy_check_decides_with_the_policy_in_force(node: PolicyNode) -> None:
    pod = node.pod("api")
    write(node.policies / "api.yaml", allow("GET"))
    node.start()
    enrolled = node.cli("enroll", pod, "--namespace", "shop", "--service-account", "api",
                        "--label", "app=api", "--label", "version=v1")  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    stored = json.loads(node.store())["workloads"][0]
    assert stored["labels"] == {"app": "api", "version": "v1"}

    web = ("--from-principal", "cluster.local/ns/shop/sa/web", "--port", "8080")
    allowed = node.check(pod, *web, "--method", "GET", "--path", "/items")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("ALLOW  ")
    assert "decided by AuthorizationPolicy shop/api-allow rule 0 (ALLOW: allowed_by_policy)" in (
        allowed.stdout
    )
    denied = node.check(pod, *web, "--method", "POST", "--json")
    assert denied.returncode == 1, denied.stderr
    answer = json.loads(denied.stdout)
    assert (answer["allowed"], answer["reason"], answer["version"]) == (
        False,
        "no_allow_match",
        1,
    )
    assert answer["policies"] == ["AuthorizationPolicy shop/api-allow"]

    started = time.monotonic()
    write(node.policies / "api.yaml", allow("GET, POST"))  # live: applied within a second
    node.wait(lambda: node.status()["version"] == 2, "policy version 2", timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert node.check(pod, *web, "--method", "POST").returncode == 0

    write(node.policies / "typo.yaml", INVALID)  # rejected: the last good policy stays
    node.wait(lambda: node.status()["rejected"] is not None, "the rejection", timeout=1.0)
    assert node.status()["version"] == 2
    assert node.check(pod, *web, "--method", "POST").returncode == 0
    status = node.cli("status", "--json")
    document = json.loads(status.stdout)
    [problem] = [p for p in document["problems"] if p.startswith("policy change rejected")]
    assert str(node.policies / "typo.yaml") in problem and "notPrinciple" in problem
    [workload] = document["workloads"]
    assert workload["labels"] == {"app": "api", "version": "v1"}
    assert workload["policies"] == ["AuthorizationPolicy shop/api-allow"]
    table = node.cli("status").stdout
    assert f"  {pod}: labels app=api,version=v1" in table

    bad = node.cli("enroll", node.pod("other"), "--namespace", "shop", "--service-account",
                   "x", "--label", "tier=front end")  # fmt: skip
    assert bad.returncode == 1 and "invalid value 'front end' of label 'tier'" in bad.stderr

    usage = node.check(pod, "--port", "8080")  # no source
    assert usage.returncode == 2 and "give the source" in usage.stderr
    unknown = node.check("no-such-pod", *web)
    assert unknown.returncode == 2 and "is not enrolled" in unknown.stderr, unknown.stderr
    assert ferry_rules(pod) != []


def test_jwks_uri_keys_are_fetched_and_check_verifies_tokens(node: PolicyNode) -> None:
    pod = node.pod("api")
    (node.jwks_dir / "jwks.json").write_text(jwks(KEY))
    node.serve_jwks()
    node.wait(lambda: _serving(node), "the JWKS server")
    write(node.policies / "api.yaml", allow("GET"))
    write(node.policies / "jwt.yaml", REQUEST_AUTHENTICATION)
    node.start()
    assert node.cli("enroll", pod, "--namespace", "shop", "--service-account", "api",
                    "--label", "app=api").returncode == 0  # fmt: skip
    uri = f"http://127.0.0.1:{JWKS_PORT}/jwks.json"
    jwks_status = node.status()["jwks"][uri]
    assert (jwks_status["outcome"], jwks_status["keys"]) == ("ok", 1)

    plain = ("--from-ip", "10.0.0.9", "--port", "8080", "--path", "/x")
    alice = node.check(pod, *plain, "--jwt", bearer("alice"))
    assert alice.returncode == 0, alice.stdout + alice.stderr
    assert "rule 1" in alice.stdout and f"JWT: token of {ISSUER}/alice" in alice.stdout
    bob = node.check(pod, *plain, "--jwt", bearer("bob"))
    assert bob.returncode == 1
    forged = token(ec_key(), {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 60})
    rejected = node.check(pod, *plain, "--jwt", forged)
    assert rejected.returncode == 1
    assert "rejected by JWT authentication (401)" in rejected.stdout
    assert forged not in node.log.read_text()  # never logged

    rotated = ec_key()  # the provider rotates its key: picked up at the next refresh
    (node.jwks_dir / "jwks.json").write_text(jwks(rotated))
    node.wait(lambda: node.status()["version"] == 2, "the refreshed keys", timeout=5.0)
    fresh = token(rotated, {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 60})
    assert node.check(pod, *plain, "--jwt", fresh).returncode == 0
    assert node.check(pod, *plain, "--jwt", bearer("alice")).returncode == 1  # the old key

    assert node.idp is not None
    node.idp.kill()  # the provider goes away: the last good keys stay
    node.idp.wait()
    node.idp = None
    node.wait(lambda: node.status()["jwks"][uri]["outcome"] != "ok", "the failed refresh")
    assert node.status()["jwks"][uri]["keys"] == 1
    assert node.check(pod, *plain, "--jwt", fresh).returncode == 0


def _serving(node: PolicyNode) -> bool:
    probe = subprocess.run(
        ["ip", "netns", "exec", node.netns, "python3", "-c",
         f"import socket; socket.create_connection(('127.0.0.1', {JWKS_PORT}), 1)"],
        capture_output=True, check=False,
    )  # fmt: skip
    return probe.returncode == 0


def test_without_an_agent_policy_check_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "policy", "check", "web", "--from-ip", "10.0.0.1",
         "--port", "80", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "no agent answers" in result.stderr, result.stderr


def test_the_last_good_policy_survives_an_agent_restart(node: PolicyNode) -> None:
    pod = node.pod("api")
    write(node.policies / "api.yaml", allow("GET"))
    node.start()
    assert node.cli("enroll", pod, "--namespace", "shop", "--service-account", "api",
                    "--label", "app=api").returncode == 0  # fmt: skip
    web = ("--from-principal", "cluster.local/ns/shop/sa/web", "--port", "8080")
    node.stop()
    write(node.policies / "typo.yaml", INVALID)
    other = node.pod("other")  # enrolled while the agent is down: recorded with its labels
    offline = node.cli("enroll", other, "--namespace", "shop", "--service-account", "other",
                       "--label", "app=other")  # fmt: skip
    assert offline.returncode == 0 and "recorded" in offline.stdout, offline.stderr
    node.start()
    assert node.status()["version"] == 1 and node.status()["rejected"] is not None
    assert node.check(pod, *web, "--method", "GET").returncode == 0
    assert node.check(pod, *web, "--method", "POST").returncode == 1
    assert node.check(other, *web, "--method", "POST").returncode == 0  # no policy selects it
    labels = {w["name"]: w["labels"] for w in json.loads(node.store())["workloads"]}
    assert labels == {pod: {"app": "api"}, other: {"app": "other"}}


def test_a_file_change_is_enforced_by_every_proxy_worker_within_a_second(
    node: PolicyNode,
) -> None:
    """The issue's measure, from the file write to the proxy workers' own report."""
    pod = node.pod("api")
    write(node.policies / "api.yaml", allow("GET"))
    node.start()
    assert node.cli("enroll", pod, "--namespace", "shop", "--service-account", "api",
                    "--label", "app=api").returncode == 0  # fmt: skip
    node.start_proxy(workers=2)
    node.wait(lambda: node.enforced() == [1, 1], "the snapshot's policy in both workers")
    elapsed = []
    for version, methods in enumerate(["GET, POST", "PUT", "GET"], start=2):
        started = time.monotonic()
        write(node.policies / "api.yaml", allow(methods))
        node.wait(lambda v=version: node.enforced() == [v, v], f"version {version}", 2.0)
        elapsed.append(time.monotonic() - started)
    print(f"file change -> every proxy worker enforcing it: {[round(e, 3) for e in elapsed]} s")
    assert max(elapsed) < 1.0, elapsed
    table = node.cli("status").stdout
    assert "enforced by 2/2 proxy worker(s)" in table, table
