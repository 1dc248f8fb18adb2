"""`agent cni install|uninstall`: put `ferry-cni` on a node, and keep it chained (thin adapter).

`install` copies the plugin binary into the CNI bin dir and chains Ferry's entry into the
primary network configuration of the CNI conf dir (the decisions are `agent.cni_conflist`'s).
Every write is atomic: the new content goes to a hidden temporary file in the same directory
(a name the runtime never loads: it reads only `*.conf`, `*.conflist` and `*.json`), is synced,
and is renamed over the old one, so the runtime reads either the old file or the new one, never
half of one; the binary is replaced the same way, so a plugin that is running keeps its file.
A `.conf` converted to a `.conflist` is written first and removed after.

`watch` is the DaemonSet container's mode (`agent cni install --watch`): install, then keep it
installed.  Primary CNIs rewrite their conflist (calico's and flannel's install containers do
on every restart) and drop entries they do not know; inotify on the conf dir (every create,
write, rename or delete of an entry) wakes the watcher, which installs again after a short
debounce, and a rescan every `RESCAN` seconds is the safety net.  A conf dir without a
primary configuration yet (the primary CNI starts after Ferry) is waited for the same way.
Stopping the watcher (SIGTERM, as on a DaemonSet rolling update) leaves everything installed:
only `uninstall` removes Ferry's entries (from every configuration file holding one) and its
binary, so an upgrade never opens a window in which pods start without the plugin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.cni_conflist import (
    PLUGIN_TYPE,
    SUFFIXES,
    ConflistError,
    primary,
    with_plugin,
    without_plugin,
)
from agent.linux import (
    IN_CLOSE_WRITE,
    IN_CREATE,
    IN_DELETE,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    Inotify,
)

log = logging.getLogger("ferry.cni")

DEBOUNCE = 0.1
RESCAN = 10.0
MAX_FILE = 1 << 20
WATCHED = IN_CREATE | IN_DELETE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO


class NoPrimaryNetwork(ConflistError):
    """The conf dir holds no usable network configuration to chain into (yet)."""


def default_plugin() -> Path:
    """The plugin `make setup` builds: build/ferry-cni next to the agent package."""
    return Path(__file__).resolve().parent.parent / "build" / PLUGIN_TYPE


def _atomic_write(path: Path, content: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.ferry-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _configs(conf_dir: Path) -> dict[str, bytes]:
    files = {}
    for path in conf_dir.iterdir():
        if path.name.endswith(SUFFIXES) and path.is_file():
            with contextlib.suppress(OSError):  # gone meanwhile: the next event says so
                files[path.name] = path.read_bytes()[:MAX_FILE]
    return files


def install_binary(plugin: Path, bin_dir: Path) -> bool:
    """Copy `plugin` to `bin_dir/ferry-cni` unless it is there already; whether it copied."""
    content = plugin.read_bytes()
    target = bin_dir / PLUGIN_TYPE
    with contextlib.suppress(OSError):
        if target.read_bytes() == content:
            return False
    bin_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, content, 0o755)
    return True


def install_config(conf_dir: Path, entry: Mapping[str, Any]) -> str | None:
    """Chain `entry` into the primary configuration; the file written (None: nothing to do)."""
    files = _configs(conf_dir)
    name = primary(files)
    if name is None:
        raise NoPrimaryNetwork(
            f"no network configuration to chain ferry-cni into in {conf_dir} (no usable *.conf "
            "or *.conflist: the primary CNI plugin has not written one yet)"
        )
    change = with_plugin(name, files[name], entry)
    if change is None:
        return None
    new_name, content = change
    _atomic_write(conf_dir / new_name, content, 0o644)
    if new_name != name:
        (conf_dir / name).unlink(missing_ok=True)
    return new_name


def install(plugin: Path, conf_dir: Path, bin_dir: Path, entry: Mapping[str, Any]) -> list[str]:
    """Install the binary and chain the entry; what changed, one line each."""
    if not plugin.is_file():
        raise ConflistError(f"plugin binary {plugin} not found (build it with `make setup`)")
    changed = []
    if install_binary(plugin, bin_dir):
        changed.append(f"installed {bin_dir / PLUGIN_TYPE}")
    written = install_config(conf_dir, entry)
    if written is not None:
        changed.append(f"chained ferry-cni into {conf_dir / written}")
    return changed


def uninstall(conf_dir: Path, bin_dir: Path) -> list[str]:
    """Remove Ferry's entries from every configuration file, and its binary; what changed."""
    changed = []
    if conf_dir.is_dir():
        for name, content in sorted(_configs(conf_dir).items()):
            cleaned = without_plugin(name, content)
            if cleaned is not None:
                _atomic_write(conf_dir / name, cleaned, 0o644)
                changed.append(f"removed ferry-cni from {conf_dir / name}")
    binary = bin_dir / PLUGIN_TYPE
    if binary.exists():
        binary.unlink()
        changed.append(f"removed {binary}")
    return changed


def watch(
    plugin: Path,
    conf_dir: Path,
    bin_dir: Path,
    entry: Mapping[str, Any],
    report: Callable[[str], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Install, then reinstall whenever the conf dir changes, until `stop()` or a signal."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = [signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)]
    waiting_reported = False
    with Inotify() as inotify:
        inotify.add_watch(conf_dir, WATCHED)
        try:
            while not (stopping or stop()):
                try:
                    for line in install(plugin, conf_dir, bin_dir, entry):
                        report(line)
                    waiting_reported = False
                except NoPrimaryNetwork as exc:
                    if not waiting_reported:
                        report(f"waiting: {exc}")
                        waiting_reported = True
                except (ConflistError, OSError) as exc:
                    report(f"install failed (retrying on the next change): {exc}")
                _wait(inotify, lambda: stopping or stop())
        finally:
            for sig, handler in zip((signal.SIGTERM, signal.SIGINT), previous, strict=True):
                signal.signal(sig, handler)
    report("stopped watching; ferry-cni stays installed (`agent cni uninstall` removes it)")


def _wait(inotify: Inotify, stopped: Callable[[], bool]) -> None:
    """Until an event in the conf dir (plus the debounce) or the rescan interval."""
    deadline = time.monotonic() + RESCAN
    while not stopped():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            ready, _, _ = select.select([inotify], [], [], min(left, 0.5))
        except InterruptedError:
            continue
        if ready:
            inotify.read()
            time.sleep(DEBOUNCE)
            while select.select([inotify], [], [], 0)[0]:
                inotify.read()
            return
