"""`agent cni install|uninstall`: the commands that chain `ferry-cni` into a node's CNI config.

Loaded only when `agent cni` is used (`agent.cli.Commands`).  The work is `agent.cni_install`'s;
this module reads the options and prints one line per change, or one line naming what was wrong.
"""

from __future__ import annotations

from pathlib import Path

import click

from agent.cni_conflist import ConflistError, plugin_entry
from agent.cni_protocol import DEFAULT_EXCLUDED, DEFAULT_STATE_DIR

conf_dir_option = click.option(
    "--cni-conf-dir",
    "conf_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/etc/cni/net.d"),
    show_default=True,
    help="The runtime's CNI configuration directory.",
)
bin_dir_option = click.option(
    "--cni-bin-dir",
    "bin_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("/opt/cni/bin"),
    show_default=True,
    help="The runtime's CNI plugin directory.",
)


@click.group()
def cni() -> None:
    """Install or remove the chained CNI plugin `ferry-cni`."""


@cni.command()
@conf_dir_option
@bin_dir_option
@click.option(
    "--plugin",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The ferry-cni binary to install (default: build/ferry-cni, built by make setup).",
)
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    envvar="FERRY_STATE_DIR",
    help="The agent's state dir, where the plugin finds cni.sock.",
)
@click.option(
    "--exclude-namespace",
    "excluded",
    multiple=True,
    metavar="NS",
    help="A namespace whose pods are never enrolled and start while the agent is down "
    f"(repeatable; default: {', '.join(DEFAULT_EXCLUDED)}).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=3599),
    default=None,
    help="Seconds the plugin waits for the agent's answer (default 30).",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Keep it installed: reinstall whenever the conf dir changes (a DaemonSet container); "
    "stopping leaves it installed.",
)
def install(
    conf_dir: Path,
    bin_dir: Path,
    plugin: Path | None,
    state_dir: str,
    excluded: tuple[str, ...],
    timeout: float | None,
    watch: bool,
) -> None:
    """Copy ferry-cni into the bin dir and chain it into the primary network configuration."""
    from agent import cni_install

    settings = {} if timeout is None else {"timeout": timeout}
    entry = plugin_entry(state_dir, excluded or DEFAULT_EXCLUDED, **settings)
    binary = plugin or cni_install.default_plugin()
    if not conf_dir.is_dir():
        raise click.ClickException(f"CNI conf dir {conf_dir} does not exist")
    if watch:
        cni_install.watch(binary, conf_dir, bin_dir, entry, lambda line: click.echo(line))
        return
    try:
        changed = cni_install.install(binary, conf_dir, bin_dir, entry)
    except (ConflistError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    for line in changed or ["ferry-cni is installed already; nothing changed"]:
        click.echo(line)


@cni.command()
@conf_dir_option
@bin_dir_option
def uninstall(conf_dir: Path, bin_dir: Path) -> None:
    """Remove ferry-cni's entries from the CNI configuration and its binary (nothing else)."""
    from agent import cni_install

    try:
        changed = cni_install.uninstall(conf_dir, bin_dir)
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    for line in changed or ["ferry-cni was not installed; nothing changed"]:
        click.echo(line)
