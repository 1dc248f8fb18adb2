"""Shared fixtures: simulated nodes (sim/node.py) that are always torn down, and a leak check.

Every namespace a test makes, SimNodes included, is named `ferry-t<run id>-...` (`tests.run_id`),
so two runs can share the machine and the session-end check can tell this run's leftovers from
anyone else's.  That check fails the run when anything the tests made outlived them: network
namespaces of this run, processes the tests started (the pytest process's descendants), and
namespace or socket descriptors the pytest process opened and never closed, and bpffs mounts
under this run's directories (the eBPF backend's pins: unmounting detaches its programs); it
cleans them up and names them.  The eBPF backend's compiled object is cached for the whole
session in one directory (FERRY_BPF_CACHE_DIR), so it is compiled once per run, not per test.
A test that needs nodes but runs somewhere they cannot be built (not root, CNI plugins missing)
fails with the reason; it is never skipped.

`make test` runs the modules on several pytest-xdist workers (`--dist loadfile`: a module stays
on one worker).  Modules that build namespaces share the machine; a module in `MACHINE_WIDE`
needs it alone (`agent cleanup` sweeps Ferry's rules out of every namespace on the machine, or
it asserts latency and repair bounds that other suites' load would blur), so it takes the
machine lock exclusively and every other module (unit tests too: their CPU is load) takes it
shared, for the whole module (its fixtures too).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from sim.node import CNI_PATH, CNI_PLUGINS, NETNS_DIR, SimNode
from tests.run_id import NAME_PREFIX, RUN_ID, SIM_PREFIX

_BASELINE_FDS: dict[int, str] = {}
MACHINE_WIDE = {
    "tests/e2e/test_backends.py",
    "tests/e2e/test_datapath.py",
    "tests/e2e/test_kube_probes.py",
    "tests/e2e/test_loss_watch.py",
    "tests/e2e/test_policy.py",  # exact rate-limit counts over 40 simultaneous connections
    "tests/integration/test_hostile.py",
}
_BPF_CACHE = Path(tempfile.gettempdir()) / f"ferry-bpf-{RUN_ID}"


def _missing_requirements() -> list[str]:
    missing: list[str] = []
    if os.geteuid() != 0:
        missing.append("root privileges (run pytest as root)")
    for plugin in CNI_PLUGINS:
        path = CNI_PATH / plugin
        if not os.access(path, os.X_OK):
            missing.append(f"CNI plugin {path} (Debian package containernetworking-plugins)")
    for tool in ("ip", "ss", "sysctl"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH (iproute2 / procps)")
    return missing


@pytest.fixture(scope="session")
def sim_environment() -> None:
    """Fail (never skip) every test needing simulated nodes when they cannot be built here."""
    missing = _missing_requirements()
    if missing:
        pytest.fail(
            "simulated nodes need: " + "; ".join(missing) + ". Run `make setup` as root.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def privileged() -> None:
    """Fail (never skip) kernel tests when they cannot run: they need root and the tools."""
    missing = [] if os.geteuid() == 0 else ["root privileges (run pytest as root)"]
    for tool in ("ip", "iptables-legacy", "iptables-legacy-save", "ip6tables-legacy-save"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH (Debian packages iproute2, iptables)")
    if missing:
        pytest.fail("kernel tests need: " + "; ".join(missing) + ". Run `make setup` as root.",
                    pytrace=False)  # fmt: skip


@pytest.fixture(scope="session")
def sim_prefix() -> str:
    """The name prefix of this run's nodes (`SimNode(sim_prefix)` is named ferry-<prefix>-...)."""
    return SIM_PREFIX


@pytest.fixture
def sim_node_factory(sim_environment: None) -> Iterator[Callable[[], SimNode]]:
    """Make as many fresh nodes as the test needs; all are torn down after it, even on failure."""
    nodes: list[SimNode] = []

    def make() -> SimNode:
        node = SimNode(SIM_PREFIX)
        nodes.append(node)
        return node

    yield make
    errors = []
    for node in reversed(nodes):
        try:
            node.teardown()
        except Exception as exc:
            errors.append(str(exc))
        if (NETNS_DIR / node.netns).exists():
            errors.append(f"netns {node.netns} still exists after teardown")
    assert not errors, errors


@pytest.fixture
def sim_node(sim_node_factory: Callable[[], SimNode]) -> SimNode:
    """A fresh simulated node, torn down after the test even when it fails."""
    return sim_node_factory()


def _fd_targets() -> dict[int, str]:
    """The pytest process's namespace and socket descriptors: fd -> what it points at.

    Raw IP sockets are left out: python-iptables keeps one libiptc handle per table (ten at
    most), each holding a raw socket, for the life of the process; that is bounded and not a
    test's leak.
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and _is_raw(int(name)):
            continue
        if target.startswith(("net:[", "socket:[")):
            found[int(name)] = target
    return found


def _is_raw(fd: int) -> bool:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            return sock.type == socket.SOCK_RAW
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def machine_lock(request: pytest.FixtureRequest) -> Iterator[None]:
    """Shared or exclusive use of the machine by this module, when workers run in parallel."""
    module = request.path.relative_to(Path(__file__).resolve().parents[1]).as_posix()
    # Two files of this checkout (every worker of every run sees them): a turnstile, taken
    # briefly by every module and held by a machine-wide one until it has the machine, so a
    # machine-wide module waits only for the modules already running, never for new ones.
    with open(Path(__file__).with_name("run_id.py")) as turnstile, open(__file__) as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(machine, fcntl.LOCK_EX if module in MACHINE_WIDE else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


def pytest_sessionstart(session: pytest.Session) -> None:
    _BASELINE_FDS.update(_fd_targets())
    os.environ.setdefault("FERRY_BPF_CACHE_DIR", str(_BPF_CACHE))


def _leaked_bpffs(session: pytest.Session) -> list[str]:
    """bpffs mounts under this run's temporary directories (unmounted now)."""
    ours = [str(session.config._tmp_path_factory.getbasetemp()), RUN_ID]  # type: ignore[attr-defined]
    leaked = []
    with open("/proc/self/mountinfo") as mounts:
        for line in mounts:
            fields = line.split()
            where, kind = fields[4], fields[fields.index("-") + 1]
            if kind == "bpf" and any(mark in where for mark in ours):
                leaked.append(where)
    for where in reversed(leaked):
        subprocess.run(["umount", where], check=False, capture_output=True)
    return leaked


def _leaked_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    leaked = sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NAME_PREFIX))
    for name in leaked:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return leaked


def _leaked_processes() -> list[str]:
    leaked = []
    for child in psutil.Process().children(recursive=True):
        try:
            leaked.append(f"pid {child.pid} {' '.join(child.cmdline())[:120]}")
            child.kill()
        except psutil.Error:
            continue
    return leaked


def _leaked_fds() -> list[str]:
    return [
        f"fd {fd} -> {target}"
        for fd, target in sorted(_fd_targets().items())
        if _BASELINE_FDS.get(fd) != target
    ]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if anything this run made outlived it (and remove what can be removed)."""
    problems = []
    if leaked := _leaked_netns():
        problems.append(f"network namespaces (now deleted): {', '.join(leaked)}")
    if leaked := _leaked_processes():
        problems.append(f"processes (now killed): {'; '.join(leaked)}")
    if leaked := _leaked_fds():
        problems.append(f"descriptors of the pytest process: {', '.join(leaked)}")
    if leaked := _leaked_bpffs(session):
        problems.append(f"bpffs mounts with eBPF pins (now unmounted): {', '.join(leaked)}")
    shutil.rmtree(_BPF_CACHE, ignore_errors=True)
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for problem in problems:
        if reporter is not None:
            reporter.write_line(f"\nERROR: leaked {problem}", red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
