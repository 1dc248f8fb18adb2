"""Shared fixtures: simulated nodes (sim/node.py) that are always torn down, and a leak check.

Every SimNode made through these fixtures is named `ferry-t<run id>-...`, with a random run id
per pytest session, so two runs can share the machine and the session-end check can tell this
run's leftovers from anyone else's.  A test that needs nodes but runs somewhere they cannot be
built (not root, CNI plugins missing) fails with the reason; it is never skipped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from sim.node import CNI_PATH, CNI_PLUGINS, NETNS_DIR, SimNode

RUN_ID = secrets.token_hex(3)
SIM_PREFIX = f"t{RUN_ID}"


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


def _leaked_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"ferry-{SIM_PREFIX}-"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any of this run's namespaces outlived it (and remove them)."""
    leaked = _leaked_netns()
    if not leaked:
        return
    for name in leaked:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"leaked network namespaces from this run (now deleted): {', '.join(leaked)}"
    if reporter is not None:
        reporter.write_line(f"\nERROR: {message}", red=True, bold=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
