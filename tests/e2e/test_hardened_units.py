"""Ferry still works under the hardening of its systemd units (what can be applied without systemd).

This machine's PID 1 is not systemd, so `systemd-run -p ...` cannot run the units.  What the
units' hardening does to the processes is applied here with the mechanisms systemd itself uses,
read from systemd/*.service so the test follows the units:

- `CapabilityBoundingSet=` and `NoNewPrivileges=`: `setpriv --bounding-set ... --no-new-privs`
  (root keeps only the bounding set across exec, exactly as under systemd);
- the proxy's `ProtectSystem=full` and `ProtectHome=yes`: a mount namespace (`unshare --mount
  --propagation slave`, systemd's setup) with /usr, /boot and /etc read-only and /home, /root
  and /run/user empty and read-only;
- `RestrictAddressFamilies=`, `RestrictNamespaces=`, `LockPersonality=`, `RestrictRealtime=` and
  `SystemCallArchitectures=native`: seccomp filters built with libseccomp as systemd builds
  them (`seccomp_exec.py`).

Then a simulated node runs the agent and the proxy so restricted, with the iptables and the eBPF
backends: two pods are enrolled, a request goes through the proxy (the server sees the client's
address), a DENY policy is enforced, and `agent status` is healthy.  The processes' own
/proc/<pid>/status shows the bounding set, no_new_privs and a seccomp filter in force, the
proxy's mountinfo a read-only /usr and /etc.  Not applied here (they need systemd itself):
ProtectClock=, ProtectHostname=, PrivateTmp=, PrivateDevices=, ProtectKernelTunables=,
ProtectKernelModules=, ProtectKernelLogs=, ProtectControlGroups=, UMask=.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.redirect import ebpf
from agent.redirect.ebpf_object import load_or_compile
from sim.ferry import FerryNode, in_host_mounts
from sim.node import Pod, SimNode
from tests.e2e.test_datapath import wait_until

REPO = Path(__file__).resolve().parents[2]
SECCOMP_EXEC = Path(__file__).with_name("seccomp_exec.py")
CAPABILITY_BITS = {
    "CAP_DAC_OVERRIDE": 1, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}  # fmt: skip
READ_ONLY = ("/usr", "/boot", "/etc")  # ProtectSystem=full
EMPTY = ("/home", "/root", "/run/user")  # ProtectHome=yes


def service(unit: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / unit)
    return parser["Service"]


def capabilities(section: configparser.SectionProxy) -> list[str]:
    names = section["CapabilityBoundingSet"].split()
    unknown = [name for name in names if name not in CAPABILITY_BITS]
    assert not unknown, f"add {unknown} to CAPABILITY_BITS"
    return names


def confined(section: configparser.SectionProxy, argv: list[str]) -> list[str]:
    """`argv` run as the unit's [Service] section would run it (the part setpriv and unshare do)."""
    caps = ",".join(["-all", *(f"+{name[4:].lower()}" for name in capabilities(section))])
    wrapped = ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all"]
    if section.get("NoNewPrivileges") == "yes":
        wrapped.append("--no-new-privs")
    wrapped.append("--")
    families, namespaces = section.get("RestrictAddressFamilies"), section.get("RestrictNamespaces")
    if families and namespaces:
        wrapped += ["/usr/bin/python3", str(SECCOMP_EXEC), families, namespaces, "--"]
    wrapped += argv
    mounts = []
    if section.get("ProtectSystem") == "full":
        mounts += [f"mount --bind {d} {d} && mount -o remount,bind,ro {d}" for d in READ_ONLY]
    if section.get("ProtectHome") == "yes":
        mounts += [f"mount -t tmpfs -o ro,mode=0755 tmpfs {d}" for d in EMPTY]
    if not mounts:
        return wrapped
    script = "; ".join(f"if [ -d {m.split()[-1]} ]; then {m} || exit 1; fi" for m in mounts)
    return ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c",
            f'{script}; exec "$@"', "sh", *wrapped]  # fmt: skip


class HardenedFerry(FerryNode):
    """`agent run` and `agent proxy` under their units' hardening; the CLI as usual.  All in
    the test process's mount namespace, as systemd runs services in the host's: `ip netns exec`
    mounts a sysfs of its own, without the cgroup v2 hierarchy the eBPF backend attaches to."""

    def _argv(self, *args: str) -> list[str]:
        argv = super()._argv(*args)
        unit = {"run": "ferry-agent.service", "proxy": "ferry-proxy.service"}.get(args[0])
        return in_host_mounts(confined(service(unit), argv) if unit else argv)


def status_word(path: Path, field: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split()[1]
    raise AssertionError(f"no {field} in {path}")


def read_only_mounts(pid: int) -> set[str]:
    """The mount points a process sees read-only (its /proc/<pid>/mountinfo)."""
    found = set()
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if "ro" in fields[5].split(","):
            found.add(fields[4])
    return found


def own_bounding_set() -> int:
    return int(status_word(Path("/proc/self/status"), "CapBnd"), 16)


def bounding_mask(names: list[str]) -> int:
    return sum(1 << CAPABILITY_BITS[name] for name in names)


@pytest.fixture(params=["iptables", "ebpf"])
def hardened(
    request: pytest.FixtureRequest, sim_node: SimNode, tmp_path: Path
) -> Iterator[HardenedFerry]:
    if request.param == "ebpf":
        load_or_compile(Path(os.environ[ebpf.CACHE_ENV]))  # compiled once per session
    config = {"policy": {"directory": str(tmp_path / "policies")}}
    ferry = HardenedFerry(sim_node, workers=1, config=config)
    try:
        ferry.start_agent("--backend", request.param)
        ferry.start_proxy()
        ferry.wait_connected()
        yield ferry
    except BaseException:
        print(ferry.log_text())
        raise
    finally:
        ferry.stop(ferry.agent)
        ferry.stop(ferry.proxy)
        ebpf.cleanup(ferry.state_dir)  # the bpffs the agent mounted (no-op for iptables)


def test_agent_and_proxy_work_under_their_units_capabilities_and_protections(
    hardened: HardenedFerry,
) -> None:
    ferry, node = hardened, hardened.node
    for proc, unit in ((ferry.agent, "ferry-agent.service"), (ferry.proxy, "ferry-proxy.service")):
        assert proc is not None
        proc_status = Path(f"/proc/{proc.pid}/status")
        assert "agent" in Path(f"/proc/{proc.pid}/cmdline").read_text()
        # what the unit grants, of what this machine has (a container may lack some)
        expected = bounding_mask(capabilities(service(unit))) & own_bounding_set()
        assert int(status_word(proc_status, "CapBnd"), 16) == expected
        assert status_word(proc_status, "NoNewPrivs") == "1"
        assert status_word(proc_status, "Seccomp") == "2"  # a filter: seccomp_exec.py's
    assert ferry.proxy is not None
    assert read_only_mounts(ferry.proxy.pid) >= {"/usr", "/etc"}  # ProtectSystem=full
    server, client = node.add_pod("server"), node.add_pod("client")
    server.start_http_server(8080)
    ferry.enroll(client, "shop", "client")
    ferry.enroll(server, "shop", "server", {"app": "api"})
    assert client.fetch_json(f"http://{server.ip4}:8080/")["peer"] == client.ip4
    status = ferry.status()
    assert status["healthy"], status["problems"]
    assert inbound_opened(ferry, server) >= 1
    policies = Path(yaml.safe_load(ferry.config_path.read_text())["policy"]["directory"])
    policies.mkdir()
    (policies / "deny.yaml").write_text(DENY_CLIENT.format(client=client.ip4))
    wait_until(lambda: client.curl(f"http://{server.ip4}:8080/").returncode != 0, "the DENY")
    assert ferry.status()["healthy"]


def inbound_opened(ferry: FerryNode, pod: Pod) -> int:
    return int(ferry.workload(pod)["traffic"].get("inbound", {}).get("connections_opened", 0))


DENY_CLIENT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-client, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: DENY
  rules: [{{from: [{{source: {{ipBlocks: ["{client}"]}}}}]}}]
"""
