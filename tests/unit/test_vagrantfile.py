"""The Vagrantfile is valid and provisions Ferry the way the README tells a user to.

`vagrant validate` (Debian package vagrant) loads the Vagrantfile as `vagrant up` would, without
a provider (none is installed here, and no VM starts), with its own VAGRANT_HOME and dot-file
directory so it writes nothing into the checkout or the user's home.  Then every command of the
README's "Plain Linux host" block must be one the Vagrantfile's provisioning runs, and so must
`make demo` and `make test`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def plain_host_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Plain Linux host\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README's Plain Linux host section has no ```sh block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    return [command for command in commands if command]


def test_vagrant_validate_passes(tmp_path: Path) -> None:
    vagrant = shutil.which("vagrant")
    assert vagrant is not None, "vagrant is missing (Debian package vagrant)"
    env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_CWD": str(REPO),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    out = subprocess.run([vagrant, "validate", "--ignore-provider"], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully." in out.stdout


def test_the_vagrant_vm_runs_the_readme_commands_the_demo_and_the_suite() -> None:
    provisioning = (REPO / "Vagrantfile").read_text()
    commands = plain_host_commands()
    assert {"make install", "systemctl enable --now ferry-agent ferry-proxy"} <= set(commands)
    optional = {c for c in commands if c.startswith("agent ca ")}  # needs the user's CA
    missing = [c for c in [*commands, "make demo", "make test"]
               if c not in optional and c not in provisioning]  # fmt: skip
    assert not missing, f"the Vagrantfile does not run {missing}"
