"""`make demo`: two simulated nodes with real workloads and real traffic through Ferry.

1. builds two node netns linked by a veth pair, with pods wired by the real CNI bridge plugin
   (`client` on node a; `web`, running nginx and an echo server, on node b);
2. makes a CA (`agent ca init`) and node credentials (`agent ca issue-node`), starts `agent run`
   and `agent proxy` on each node (one shared directory folder), enrolls the pods;
3. sends real requests from client to web: they cross the nodes inside the mutual-TLS tunnel,
   and the echo server reports the client pod's own IP as its peer;
4. prints `agent status` of both nodes and the proxies' Prometheus counters, then tears
   everything down (KEEP=1 leaves it running and prints how to reach it).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from sim.ferry import FerryNode, Mesh
from sim.node import SimNode, link_nodes


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def counters(ferry: FerryNode) -> None:
    metrics = ferry.node.exec(["curl", "-sS", "--noproxy", "*", "http://127.0.0.1:15020/metrics"])
    for line in metrics.stdout.splitlines():
        if line.startswith("ferry_proxy_connections_opened") and not line.endswith(" 0.0"):
            print("  " + line)


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
        ferry_a, ferry_b = mesh.add(node_a, workers=2), mesh.add(node_b, workers=2)
        for ferry in (ferry_a, ferry_b):
            ferry.start()
            print(f"  {ferry.node.name}: state dir {ferry.state_dir}")

        step("enrolling the pods")
        for ferry, pod, sa in ((ferry_a, client, "client"), (ferry_b, web, "web")):
            result = ferry.cli(
                "enroll", pod.netns, "--namespace", "demo", "--service-account", sa, check=True
            )
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
