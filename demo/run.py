"""`make demo`: two simulated nodes with real workloads and real traffic through Ferry.

1. builds two node netns linked by a veth pair, with pods wired by the real CNI bridge plugin
   (`client` on node a; `web`, running nginx and an echo server, on node b);
2. makes a CA (`agent ca init`) and node credentials (`agent ca issue-node`), starts `agent run`
   and `agent proxy` on each node (one shared directory folder), enrolls the pods;
3. sends real requests from client to web: they cross the nodes inside the mutual-TLS tunnel,
   and the echo server reports the client pod's own IP as its peer;
4. writes API security policy into the folder both agents watch (Istio's AuthorizationPolicy
   and RequestAuthentication, Ferry's RateLimitPolicy) and shows web's proxy enforcing it
   while traffic flows: a request denied by policy (403, with the policy's name), a JWT
   required on /api (missing: 403, forged: 401, valid: 200), a rate limit (429), and what
   `agent policy check` says about a request;
5. prints `agent status` of both nodes and the proxies' Prometheus counters, then tears
   everything down (KEEP=1 leaves it running and prints how to reach it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sim.ferry import FerryNode, Mesh
from sim.node import Pod, SimNode, link_nodes
from sim.tokens import Issuer

ISSUER = "https://issuer.demo.ferry.dev"
POLICY = """\
# Nobody reaches /admin on web.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
---
# /api needs a valid token from the demo issuer.
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: tokens, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  jwtRules:
  - issuer: "{issuer}"
    jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-needs-token, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/api/*"]}}}}],
           from: [{{source: {{notRequestPrincipals: ["*"]}}}}]}}]
---
# Five requests a minute to /api per calling identity.
apiVersion: ferry.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: api-burst, namespace: demo}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  rules:
  - match: {{paths: ["/api/*"]}}
    key: source.principal
    bucket: {{maxTokens: 5, tokensPerFill: 5, fillInterval: 1m}}
"""


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def counters(ferry: FerryNode) -> None:
    metrics = ferry.node.exec(["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:15020/metrics"])
    for line in metrics.stdout.splitlines():
        wanted = line.startswith(("ferry_proxy_connections_opened", "ferry_policy_decisions"))
        if wanted and not line.endswith(" 0.0") and "_created" not in line:
            print("  " + line)


def status_line(client: Pod, url: str, *args: str) -> str:
    """`HTTP status` and the x-ferry-denied-by header of one request from `client`."""
    result = client.curl(url, args=["-sS", "-o", "/dev/null", "-D", "-", *args])
    lines = result.stdout.splitlines()
    status = " ".join(lines[0].split()[1:]) if lines else result.stderr.strip()
    denied = [line.strip() for line in lines if line.lower().startswith("x-ferry-denied-by")]
    return status + (f"   ({denied[0]})" if denied else "")


def expect(client: Pod, url: str, code: str, *args: str, timeout: float = 5.0) -> str:
    """Repeat a request until it answers `code` (policy reaches the proxies within a second);
    the answer line."""
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = status_line(client, url, *args)
        if line.startswith(code):
            return line
        time.sleep(0.1)
    raise SystemExit(f"demo: {url} kept answering {line!r}, expected {code}")


def access_line(path: Path, trace_id: str, timeout: float = 3.0) -> str:
    """The access log line of the request with `trace_id` (the writer flushes every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [line for line in lines if f'"trace_id":"{trace_id}"' in line]
        if found:
            return found[0]
        time.sleep(0.05)
    return f"(no line with trace id {trace_id} in {path})"


def policy_demo(workdir: Path, client: Pod, web: Pod, ferry: FerryNode) -> None:
    issuer = Issuer(ISSUER)
    started = time.monotonic()
    (workdir / "policies" / "demo.yaml").write_text(
        POLICY.format(issuer=ISSUER, jwks=issuer.jwks())
    )
    print("  wrote policies/demo.yaml: 2 AuthorizationPolicies, a RequestAuthentication, a "
          "RateLimitPolicy")  # fmt: skip
    base = f"http://{web.ip4}:8080"
    line = expect(client, f"{base}/admin", "403")
    print(f"  enforced on web's node {1e3 * (time.monotonic() - started):.0f} ms after the write")
    print(f"  GET /hello                  -> {status_line(client, f'{base}/hello')}")
    print(f"  GET /admin                  -> {line}")
    trace_id = secrets.token_hex(16)
    status_line(
        client, f"{base}/admin", "-H", f"traceparent: 00-{trace_id}-{secrets.token_hex(8)}-01"
    )
    print(f"  the access log's line for a GET /admin with trace id {trace_id}:")
    print("    " + access_line(workdir / "access.log", trace_id))
    print(f"  GET /api/orders (no token)  -> {status_line(client, f'{base}/api/orders')}")
    forged = issuer.token("client")[:-8] + "AAAAAAAA"
    print(
        "  GET /api/orders (forged)    -> "
        + status_line(client, f"{base}/api/orders", "-H", f"Authorization: Bearer {forged}")
    )
    token = issuer.token("alice")
    bearer = ("-H", f"Authorization: Bearer {token}")
    answers = [status_line(client, f"{base}/api/orders", *bearer).split()[0] for _ in range(6)]
    print(f"  GET /api/orders (token) x6  -> {' '.join(answers)}   (5 a minute, then 429)")
    print("  " + status_line(client, f"{base}/api/orders", *bearer).split("(")[0].strip()
          + " again, and the 429 says when to retry:")  # fmt: skip
    limited = client.curl(f"{base}/api/orders", args=["-sS", "-o", "/dev/null", "-D", "-",
                                                      *bearer]).stdout  # fmt: skip
    for header in limited.splitlines():
        if header.lower().startswith(("retry-after", "x-ratelimit")):
            print(f"    {header.strip()}")
    step("agent policy check: why is DELETE /admin denied?")
    check = ferry.cli("policy", "check", web.netns, "--from-ip", client.ip4, "--port", "8080",
                      "--method", "DELETE", "--path", "/admin")  # fmt: skip
    print("  " + (check.stdout.strip() or check.stderr.strip()).replace("\n", "\n  "))


def main() -> int:
    keep = os.environ.get("KEEP") == "1"
    nodes: list[SimNode] = []
    workdir = Path(tempfile.mkdtemp(prefix="ferry-demo-mesh-"))
    try:
        step("two simulated nodes, pods from the CNI bridge plugin")
        node_a, node_b = SimNode("demo-a"), SimNode("demo-b")
        nodes += [node_a, node_b]
        link_nodes(node_a, node_b)
        client = node_a.add_pod("client")
        web = node_b.add_pod("web")
        web.start_nginx(80)
        web.start_http_server(8080)
        for node, pod in ((node_a, client), (node_b, web)):
            print(f"  {node.name}: pod {pod.name:6} {pod.ip4:15} {pod.ip6}")

        step("CA, node credentials, and `agent run` + `agent proxy` on each node")
        mesh = Mesh(workdir)
        policies = workdir / "policies"  # the one folder every node's agent watches
        policies.mkdir()
        settings = {
            "policy": {"directory": str(policies)},
            "telemetry": {"access_log": str(workdir / "access.log")},  # both proxies append
        }
        ferry_a = mesh.add(node_a, workers=2, config=settings)
        ferry_b = mesh.add(node_b, workers=2, config=settings)
        for ferry in (ferry_a, ferry_b):
            ferry.start()
            print(f"  {ferry.node.name}: state dir {ferry.state_dir}")

        step("enrolling the pods")
        for ferry, pod, sa in ((ferry_a, client, "client"), (ferry_b, web, "web")):
            result = ferry.cli("enroll", pod.netns, "--namespace", "demo", "--service-account",
                               sa, "--label", f"app={sa}", check=True)  # fmt: skip
            print("  " + result.stdout.strip())
        mesh.wait_directory(entries=4)

        step("client -> web, across the nodes, through the mutual-TLS tunnel")
        seen = client.fetch_json(f"http://{web.ip4}:8080/hello")
        print(f"  echo server saw peer {seen['peer']} (client pod is {client.ip4})")
        seen6 = client.fetch_json(f"http://[{web.ip6}]:8080/hello")
        print(f"  echo server saw peer {seen6['peer']} (client pod is {client.ip6})")
        for _ in range(20):
            client.curl(f"http://{web.ip4}/64k.bin", args=["-o", "/dev/null", "--fail"])
        print("  20 x GET /64k.bin from nginx: ok")

        step("API security policy, from one folder, enforced by web's node proxy")
        policy_demo(workdir, client, web, ferry_b)

        healthy = True
        for ferry in (ferry_a, ferry_b):
            step(f"agent status on {ferry.node.name}")
            status = ferry.cli("status", "--config", str(ferry.config_path))
            print(status.stdout)
            healthy = healthy and status.returncode == 0

        step("what the proxies counted (Prometheus, 127.0.0.1:15020/metrics in each node)")
        for ferry in (ferry_a, ferry_b):
            counters(ferry)
        if keep:
            step("KEEP=1: leaving it running")
            print(f"  ip netns exec {client.netns} curl http://{web.ip4}/")
            for ferry in (ferry_a, ferry_b):
                print(
                    f"  ip netns exec {ferry.node.netns} .venv/bin/agent status "
                    f"--state-dir {ferry.state_dir}"
                )
            names = " ".join(node.name for node in nodes)
            print(
                f"  remove: pkill -f {ferry_a.node.tmpdir.parent}/ferry-demo; for n in {names}; "
                'do ip netns list | grep -o "^$n[^ ]*" | xargs -rn1 ip netns del; done'
            )
            return 0
        return 0 if healthy else 1
    finally:
        if not keep:
            step("tearing down")
            for node in reversed(nodes):
                node.teardown()
            shutil.rmtree(workdir, ignore_errors=True)
            print("  done: no namespaces, links or processes left")


if __name__ == "__main__":
    sys.exit(main())
