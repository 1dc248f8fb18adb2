"""`agent cni install|uninstall` on copies of real nodes' CNI conf dirs (tests/data/cni/).

Each case is a conf dir as a primary CNI leaves it: flannel's and calico's conflists (calico's
dir also holds its kubeconfig), cilium chained behind the AWS VPC CNI (two conflists: the
lexically first is the one in use), cilium alone (a single-plugin `.conf`, behind a half-written
conflist that sorts first and must be passed over), and a plain bridge `.conf` next to a
loopback one.  The installed primary file is compared with a golden file
(`tests/golden/cni/<case>.golden`; regenerate with `UPDATE_GOLDEN=1` and review), every other
file must be byte for byte what it was, and uninstalling must leave the network as it was
(same JSON, the converted `.conf` staying a `.conflist`) with the binary gone.  The `--watch`
mode runs as the DaemonSet would run it, against a primary CNI that rewrites its conflist.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.cni_conflist import PLUGIN_TYPE, plugin_entry, primary, with_plugin
from agent.cni_install import install, uninstall

DATA = Path(__file__).resolve().parent.parent / "data" / "cni"
GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "cni"
CASES = {  # case -> (primary file before, primary file after)
    "flannel": ("10-flannel.conflist", "10-flannel.conflist"),
    "calico": ("10-calico.conflist", "10-calico.conflist"),
    "cilium-chaining": ("05-cilium.conflist", "05-cilium.conflist"),
    "cilium": ("05-cilium.conf", "05-cilium.conflist"),
    "bridge": ("10-bridge.conf", "10-bridge.conflist"),
}
ENTRY = plugin_entry("/run/ferry", ["kube-system", "ferry-system"])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    binary = tmp_path / "build" / PLUGIN_TYPE
    binary.parent.mkdir()
    binary.write_bytes(b"\x7fELF stand-in for the plugin binary\n")
    binary.chmod(0o755)
    return binary


def node(tmp_path: Path, case: str) -> tuple[Path, Path]:
    conf = tmp_path / "net.d"
    shutil.copytree(DATA / case, conf)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return conf, bin_dir


@pytest.mark.parametrize("case", sorted(CASES))
def test_install_chains_into_the_primary_network_and_touches_nothing_else(
    tmp_path: Path, plugin: Path, case: str
) -> None:
    conf, bin_dir = node(tmp_path, case)
    before_name, after_name = CASES[case]
    before = snapshot(conf)
    assert primary(before) == before_name

    changed = install(plugin, conf, bin_dir, ENTRY)

    assert changed == [
        f"installed {bin_dir / PLUGIN_TYPE}",
        f"chained ferry-cni into {conf / after_name}",
    ]
    after = snapshot(conf)
    assert (bin_dir / PLUGIN_TYPE).read_bytes() == plugin.read_bytes()
    assert os.stat(bin_dir / PLUGIN_TYPE).st_mode & 0o777 == 0o755
    untouched = {n: c for n, c in before.items() if n != before_name}
    assert {n: c for n, c in after.items() if n != after_name} == untouched
    document = json.loads(after[after_name])
    assert document["plugins"][-1] == ENTRY
    assert [p for p in document["plugins"] if p.get("type") == PLUGIN_TYPE] == [ENTRY]
    original = json.loads(before[before_name])
    if before_name.endswith(".conflist"):
        assert {k: v for k, v in document.items() if k != "plugins"} == {
            k: v for k, v in original.items() if k != "plugins"
        }
        assert document["plugins"][:-1] == original["plugins"]
    else:  # a .conf became a list: the old config first, its version and name on the list
        assert before_name not in after
        assert document["cniVersion"] == original["cniVersion"]
        assert document["name"] == original["name"]
        assert document["plugins"][0] == {k: v for k, v in original.items() if k != "cniVersion"}
    golden = GOLDEN / f"{case}.golden"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_bytes(after[after_name])
    assert golden.exists(), f"{golden} is missing; run with UPDATE_GOLDEN=1 to create it"
    assert after[after_name] == golden.read_bytes(), f"{golden} differs; UPDATE_GOLDEN=1, review"
    assert not [n for n in after if "ferry-tmp" in n], "a temporary file was left behind"


@pytest.mark.parametrize("case", sorted(CASES))
def test_install_twice_changes_nothing_and_uninstall_restores_the_network(
    tmp_path: Path, plugin: Path, case: str
) -> None:
    conf, bin_dir = node(tmp_path, case)
    before_name, after_name = CASES[case]
    original = json.loads((conf / before_name).read_bytes())
    install(plugin, conf, bin_dir, ENTRY)
    installed = snapshot(conf)

    assert install(plugin, conf, bin_dir, ENTRY) == []
    assert snapshot(conf) == installed

    assert uninstall(conf, bin_dir) == [
        f"removed ferry-cni from {conf / after_name}",
        f"removed {bin_dir / PLUGIN_TYPE}",
    ]
    assert not (bin_dir / PLUGIN_TYPE).exists()
    restored = json.loads((conf / after_name).read_bytes())
    if before_name.endswith(".conflist"):
        assert restored == original
    else:
        assert restored["plugins"] == [{k: v for k, v in original.items() if k != "cniVersion"}]
    assert uninstall(conf, bin_dir) == []


def test_an_upgrade_reinstalls_in_place(tmp_path: Path, plugin: Path) -> None:
    """A new version's entry (new settings) replaces the old one where it was; a plugin added
    after Ferry's by someone else stays after it."""
    conf, bin_dir = node(tmp_path, "calico")
    install(plugin, conf, bin_dir, ENTRY)
    path = conf / "10-calico.conflist"
    document = json.loads(path.read_bytes())
    document["plugins"].append({"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}})
    path.write_text(json.dumps(document))
    plugin.write_bytes(b"\x7fELF version 2\n")
    upgraded = plugin_entry("/run/ferry", ["kube-system"], timeout=10)

    assert install(plugin, conf, bin_dir, upgraded) == [
        f"installed {bin_dir / PLUGIN_TYPE}",
        f"chained ferry-cni into {path}",
    ]
    types = [p["type"] for p in json.loads(path.read_bytes())["plugins"]]
    assert types == ["calico", "portmap", "bandwidth", PLUGIN_TYPE, "tuning"]
    assert json.loads(path.read_bytes())["plugins"][3] == upgraded
    assert (bin_dir / PLUGIN_TYPE).read_bytes() == b"\x7fELF version 2\n"


def test_duplicate_entries_collapse_to_one() -> None:
    listed = {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}, ENTRY, ENTRY]}
    change = with_plugin("n.conflist", json.dumps(listed).encode(), ENTRY)
    assert change is not None
    assert json.loads(change[1])["plugins"] == [{"type": "bridge"}, ENTRY]


def test_no_primary_network_is_an_error_naming_the_dir(tmp_path: Path, plugin: Path) -> None:
    conf, bin_dir = node(tmp_path, "calico")
    (conf / "10-calico.conflist").unlink()
    result = run_cli("install", "--cni-conf-dir", str(conf), "--cni-bin-dir", str(bin_dir),
                     "--plugin", str(plugin))  # fmt: skip
    assert result.returncode == 1
    assert f"no network configuration to chain ferry-cni into in {conf}" in result.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "cni", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_install_and_uninstall(tmp_path: Path, plugin: Path) -> None:
    conf, bin_dir = node(tmp_path, "flannel")
    base = ["--cni-conf-dir", str(conf), "--cni-bin-dir", str(bin_dir)]
    options = ["--plugin", str(plugin), "--state-dir", "/run/ferry-x",
               "--exclude-namespace", "kube-system", "--exclude-namespace", "infra"]  # fmt: skip
    result = run_cli("install", *base, *options)
    assert result.returncode == 0, result.stderr
    assert f"chained ferry-cni into {conf / '10-flannel.conflist'}" in result.stdout
    entry = json.loads((conf / "10-flannel.conflist").read_bytes())["plugins"][-1]
    assert entry == plugin_entry("/run/ferry-x", ["kube-system", "infra"])
    again = run_cli("install", *base, *options)
    assert again.stdout.strip() == "ferry-cni is installed already; nothing changed"
    removed = run_cli("uninstall", *base)
    assert removed.returncode == 0, removed.stderr
    assert f"removed {bin_dir / PLUGIN_TYPE}" in removed.stdout
    assert json.loads((conf / "10-flannel.conflist").read_bytes()) == json.loads(
        (DATA / "flannel" / "10-flannel.conflist").read_bytes()
    )


def wait_for(check: object, what: str, timeout: float = 10.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def chained(path: Path) -> bool:
    try:
        plugins = json.loads(path.read_bytes())["plugins"]
    except (OSError, ValueError, KeyError):
        return False
    return [p.get("type") for p in plugins].count(PLUGIN_TYPE) == 1


def test_watch_survives_the_primary_cni_rewriting_its_conflist(
    tmp_path: Path, plugin: Path
) -> None:
    """The primary CNI's installer writes its own conflist again (as calico's does on every
    restart, with a rename); the watcher chains Ferry back within a second.  A conf dir that is
    empty at first is waited for.  SIGTERM (a rolling update) leaves everything installed."""
    conf, bin_dir = node(tmp_path, "calico")
    original = (conf / "10-calico.conflist").read_bytes()
    (conf / "10-calico.conflist").unlink()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "agent", "cni", "install", "--watch", "--cni-conf-dir", str(conf),
         "--cni-bin-dir", str(bin_dir), "--plugin", str(plugin)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    path = conf / "10-calico.conflist"
    try:
        time.sleep(1.0)
        assert watcher.poll() is None
        assert (bin_dir / PLUGIN_TYPE).exists()
        for _ in range(3):  # the primary CNI (re)writes its config: write, then rename
            staging = conf / ".calico.tmp"
            staging.write_bytes(original)
            staging.rename(path)
            started = time.monotonic()
            wait_for(lambda: chained(path), "ferry-cni is chained again", timeout=5)
            assert time.monotonic() - started < 2.0
            assert json.loads(path.read_bytes())["plugins"][:-1] == json.loads(original)["plugins"]
        path.write_bytes(original)  # an in-place rewrite too
        wait_for(lambda: chained(path), "ferry-cni is chained after an in-place write")
    finally:
        watcher.send_signal(signal.SIGTERM)
        output, _ = watcher.communicate(timeout=20)
    assert watcher.returncode == 0, output
    assert "waiting: no network configuration" in output
    assert "stays installed" in output
    assert chained(path) and (bin_dir / PLUGIN_TYPE).exists()
