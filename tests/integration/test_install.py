"""`make install` on a plain host: the installed units verify, and how exposed they are.

`make install` runs into a temporary DESTDIR and UNITDIR with VENV set to this checkout's
`.venv` (making a venv from PyPI takes a minute or more: `make install` without VENV does that,
and its venv is the one the units then name); the units it writes must name that venv's
`agent`, the PREFIX and nothing of the staging root.  `systemd-analyze verify` (offline: no
running systemd needed) then loads them as systemd would, and `systemd-analyze security
--offline=true` scores their exposure (0 = locked down, 10 = unprotected; an unhardened service
scores 9.6), which must stay under each unit's stated bound, printed for the record.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = ("ferry-agent.service", "ferry-proxy.service")
# The agent stays in the host's mount namespace (systemd/ferry-agent.service says why), so the
# filesystem protections score against it; the proxy has them.
EXPOSURE_BOUND = {"ferry-agent.service": 6.5, "ferry-proxy.service": 4.8}


def make_install(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    argv = ["make", "--no-print-directory", "-C", str(REPO), "install",
            *(f"{name}={value}" for name, value in variables.items())]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("destdir")
    venv = Path(sys.executable).parent.parent
    out = make_install(dest, DESTDIR=str(dest), PREFIX="/opt/ferry-test", VENV=str(venv))
    assert out.returncode == 0, out.stdout + out.stderr
    return dest


def test_make_install_writes_units_naming_the_prefix_and_the_venv(installed: Path) -> None:
    unitdir = installed / "etc" / "systemd" / "system"
    assert sorted(p.name for p in unitdir.iterdir()) == sorted(UNITS)
    agent = Path(sys.executable).parent / "agent"
    for name in UNITS:
        text = (unitdir / name).read_text()
        assert re.search(rf"^ExecStart={re.escape(str(agent))} (run|proxy)$", text, re.M), text
        assert "Documentation=file:///opt/ferry-test/README.md" in text
        assert str(installed) not in text and "/opt/ferry/" not in text
    assert (installed / "opt" / "ferry-test" / "README.md").is_file()
    assert (installed / "usr" / "local" / "bin" / "agent").readlink() == agent
    assert "FERRY_CONFIG=/etc/ferry/ferry.yaml" in (installed / "etc/default/ferry").read_text()
    config = (installed / "etc" / "ferry" / "ferry.yaml").read_text()
    assert "node_credentials: /var/lib/ferry/identity" in config


def test_make_install_keeps_an_edited_config(installed: Path, tmp_path: Path) -> None:
    config = installed / "etc" / "ferry" / "ferry.yaml"
    config.write_text("mesh:\n  default_mode: strict\n")
    venv = Path(sys.executable).parent.parent
    out = make_install(tmp_path, DESTDIR=str(installed), PREFIX="/opt/ferry-test", VENV=str(venv))
    assert out.returncode == 0, out.stderr
    assert config.read_text() == "mesh:\n  default_mode: strict\n"


@pytest.mark.parametrize(
    ("variables", "complaint"),
    [
        ({"PREFIX": "opt/ferry"}, "PREFIX must be an absolute path, not 'opt/ferry'"),
        ({"VENV": "/nonexistent"}, "VENV=/nonexistent has no bin/agent"),
        ({"BINDIR": "bin"}, "BINDIR must be an absolute path, not 'bin'"),
    ],
)
def test_make_install_refuses_bad_variables_naming_them(
    tmp_path: Path, variables: dict[str, str], complaint: str
) -> None:
    out = make_install(tmp_path, DESTDIR=str(tmp_path), **variables)
    assert out.returncode != 0 and complaint in out.stderr, out.stderr
    assert not (tmp_path / "etc").exists()  # nothing half-installed


@pytest.mark.parametrize("unit", UNITS)
def test_installed_unit_verifies(installed: Path, unit: str) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is missing (Debian package systemd)"
    path = installed / "etc" / "systemd" / "system" / unit
    out = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_installed_unit_exposure_is_under_its_bound(installed: Path, unit: str) -> None:
    path = installed / "etc" / "systemd" / "system" / unit
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", out.stdout)
    assert found, out.stdout + out.stderr
    score = float(found.group(1))
    print(f"{unit}: exposure {score} {found.group(2)} (bound {EXPOSURE_BOUND[unit]})")
    assert score <= EXPOSURE_BOUND[unit], out.stdout
