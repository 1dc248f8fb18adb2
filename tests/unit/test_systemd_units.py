"""The systemd units load cleanly and keep the promises the README makes about them.

`systemd-analyze verify` (offline: no running systemd needed) checks each unit as systemd would
load it, with /opt/ferry pointed at this checkout so the commands exist; then the proxy unit is
read for what upgrades and crashes rely on: a reload is `agent proxy --upgrade` under
`Type=notify` with `NotifyAccess=all` (the new proxy announces itself as the main process), and a
killed proxy is restarted.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    assert tool is not None, "systemd-analyze is missing (Debian package systemd)"
    local = tmp_path / unit.name
    local.write_text(unit.read_text().replace("/opt/ferry/", f"{REPO}/"))
    result = subprocess.run([tool, "verify", str(local)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_proxy_unit_reloads_by_handoff_and_restarts_a_killed_proxy() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(REPO / "systemd" / "ferry-proxy.service")
    service = parser["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "all"
    assert service["ExecStart"].endswith("agent proxy")
    assert service["ExecReload"].endswith("agent proxy --upgrade")
    assert service["Restart"] == "always"
    assert "KillMode" not in service  # stop (and restart) end every process, a draining one too
