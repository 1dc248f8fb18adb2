"""`make demo`: a simulated node with real workloads and real traffic through Ferry.

1. builds a node netns and two pods wired by the real CNI bridge plugin (an nginx + echo server
   pod `web`, and a `client` pod);
2. starts `agent run` and `agent proxy` in the node, enrolls both pods with `agent enroll`;
3. sends real requests from client to web (curl), shows which peer the server saw, and that a
   port on the outbound exclude list bypasses the proxy;
4. prints `agent status` and the proxy's Prometheus counters, then tears everything down
   (KEEP=1 leaves the node running and prints how to reach it).
"""

from __future__ import annotations

import os
import sys

from sim.ferry import FerryNode
from sim.node import SimNode


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def main() -> int:
    keep = os.environ.get("KEEP") == "1"
    node = SimNode("demo")
    try:
        step(f"simulated node {node.name}: pods from the CNI bridge plugin")
        web = node.add_pod("web")
        client = node.add_pod("client")
        web.start_nginx(80)
        web.start_http_server(8080)
        for pod in (web, client):
            print(f"  pod {pod.name:7} netns {pod.netns}  {pod.ip4}  {pod.ip6}")

        step("starting `agent run` and `agent proxy` in the node")
        ferry = FerryNode(node, workers=2, config={"redirection": {"exclude_outbound_ports": [9]}})
        ferry.start()
        print(f"  state dir {ferry.state_dir}")

        step("enrolling both pods")
        for pod, sa in ((web, "web"), (client, "client")):
            result = ferry.cli(
                "enroll", pod.netns, "--namespace", "demo", "--service-account", sa, check=True
            )
            print("  " + result.stdout.strip())

        step("client -> web through the proxy (IPv4 and IPv6)")
        seen = client.fetch_json(f"http://{web.ip4}:8080/hello")
        print(f"  echo server saw peer {seen['peer']} (client pod is {client.ip4})")
        seen6 = client.fetch_json(f"http://[{web.ip6}]:8080/hello")
        print(f"  echo server saw peer {seen6['peer']} (client pod is {client.ip6})")
        for _ in range(20):
            client.curl(f"http://{web.ip4}/64k.bin", args=["-o", "/dev/null", "--fail"])
        print("  20 x GET /64k.bin from nginx: ok")

        step("agent status")
        status = ferry.cli("status", "--config", str(ferry.config_path))
        print(status.stdout)

        step("what the proxy moved (Prometheus, 127.0.0.1:15020/metrics in the node)")
        metrics = node.exec(["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:15020/metrics"])
        for line in metrics.stdout.splitlines():
            if line.startswith("ferry_proxy_") and not line.endswith(" 0.0"):
                print("  " + line)
        if keep:
            step("KEEP=1: leaving it running")
            print(f"  ip netns exec {client.netns} curl http://{web.ip4}/")
            print(
                f"  ip netns exec {node.netns} .venv/bin/agent status --state-dir {ferry.state_dir}"
            )
            print(
                f"  remove with: ip netns exec {node.netns} true; python -m demo.teardown "
                f"{node.name}  (or reboot)"
            )
            return 0
        return 0 if status.returncode == 0 else 1
    finally:
        if not keep:
            step("tearing down")
            node.teardown()
            print("  done: no namespaces, links or processes left")


if __name__ == "__main__":
    sys.exit(main())
