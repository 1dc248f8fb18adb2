"""The everyday commands load only what they need (behaviour, not timing).

`agent enroll`, `agent unenroll` and `agent status` are typed by operators and run by a CNI plugin
on every pod start, so they must not drag in the agent's heavy libraries: `cryptography`
(certificates), `pyroute2` and python-iptables (kernel read-back, loaded only where the kernel is
read), `asyncio` (the daemon) or PyYAML (only with a config file).  Checked in fresh interpreters,
on the modules and on the real command paths (`-X importtime` lists every module a run loaded).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("cryptography", "pyroute2", "iptc", "asyncio", "yaml", "concurrent.futures", "ctypes")


def loaded_by(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(result.stdout.split())


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)


@pytest.mark.parametrize(
    "module",
    [
        "agent.cli",
        "agent.status",
        "agent.workloads",
        "agent.netns",
        "agent.names",
        "agent.linux",
        "agent.admin",
        "agent.redirect",
        "agent.redirect.rules",
        "agent.redirect.backend",
        "agent.identity.spiffe",
    ],
)
def test_importing_loads_nothing_heavy(module: str) -> None:
    assert heavy(loaded_by(f"import {module}")) == []


def test_the_agent_parts_load_without_cryptography() -> None:
    modules = loaded_by("import agent.enrollment, agent.certificates, agent.proxy_hub")
    assert "cryptography" not in {m.split(".")[0] for m in modules}


def imports_of_command(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agent", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    modules = {
        line.split("|")[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return result, modules


def test_offline_enroll_and_unenroll_stay_small(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    enroll, modules = imports_of_command(
        "enroll",
        "no-such-netns",
        "--namespace",
        "a",
        "--service-account",
        "b",
        "--state-dir",
        state,
    )
    assert enroll.returncode == 1 and "'no-such-netns' does not exist" in enroll.stderr
    assert "agent.workloads" in modules  # it did validate, offline
    assert heavy(modules) == []
    unenroll, modules = imports_of_command("unenroll", "no-such-netns", "--state-dir", state)
    assert unenroll.returncode == 1 and "is not enrolled" in unenroll.stderr
    assert heavy(modules) == []
