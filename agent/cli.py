"""The `agent` command line: run, proxy, enroll, unenroll, status, cleanup.

Every command takes `--state-dir` (default /run/ferry) so several simulated nodes can share one
machine, and the daemons take `--config` (YAML; the embedded default needs no file).  Errors are
printed as one line naming the bad value, with a non-zero exit code; nothing is half-applied.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from agent import __version__
from agent.admin import AGENT_SOCKET, AdminUnavailable, request
from agent.config import DEFAULT_STATE_DIR, MODES, Config, ConfigError, load_config
from agent.netns import NETNS_RUN_DIR, NetnsError, NetnsExecutor, is_netns_fd
from agent.workloads import EnrollmentError, EnrollmentStore, plan_enroll, plan_unenroll

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    envvar="FERRY_STATE_DIR",
    help="Directory for sockets and persisted state (one per node).",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    envvar="FERRY_CONFIG",
    help="YAML configuration (default: the embedded default).",
)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


class Commands(click.Group):
    """The command group; `ca` (and with it `cryptography`) loads only when it is used, so the
    daemons and the everyday commands stay small."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "ca"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "ca":
            from agent.identity.cli import ca

            return ca
        return super().get_command(ctx, cmd_name)


@click.group(cls=Commands)
@click.version_option(__version__, prog_name="ferry agent")
def main() -> None:
    """Ferry: a sidecar-free security data plane (node agent and per-node proxy)."""


@main.command()
@state_dir_option
@config_option
@click.option("-v", "--verbose", is_flag=True)
def run(state_dir: Path, config_path: Path | None, verbose: bool) -> None:
    """Run the node agent: enroll workloads, program redirection, feed the proxy."""
    from agent.daemon import run_agent

    config = _config(config_path)
    _logging(verbose)
    run_agent(config, state_dir)


@main.command()
@state_dir_option
@config_option
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Worker processes (default: config proxy.workers; 0 = one per core).",
)
@click.option(
    "--metrics-address",
    default=None,
    help="host:port for /metrics (default: config, 127.0.0.1:15020).",
)
@click.option("-v", "--verbose", is_flag=True)
def proxy(
    state_dir: Path,
    config_path: Path | None,
    workers: int | None,
    metrics_address: str | None,
    verbose: bool,
) -> None:
    """Run the per-node proxy (data plane)."""
    from dataclasses import replace

    from agent.config import parse_config
    from agent.proxy.supervisor import run_proxy

    config = _config(config_path)
    if metrics_address is not None:
        try:
            checked = parse_config({"proxy": {"metrics_address": metrics_address}}).proxy
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-address") from exc
        config = replace(
            config, proxy=replace(config.proxy, metrics_address=checked.metrics_address)
        )
    _logging(verbose)
    run_proxy(config, state_dir, config.proxy.workers if workers is None else workers)


@main.command()
@click.argument("netns")
@click.option("--namespace", required=True, help="Kubernetes-style namespace of the workload.")
@click.option("--service-account", required=True, help="Service account the workload runs as.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default=None,
    help="permissive: plaintext inbound from non-mesh clients still accepted; strict: only "
    "tunnelled, authenticated inbound (default: mesh.namespace_modes, then mesh.default_mode).",
)
@state_dir_option
def enroll(
    netns: str, namespace: str, service_account: str, mode: str | None, state_dir: Path
) -> None:
    """Enroll network namespace NETNS (a name under /var/run/netns, or a path)."""
    from agent.daemon import make_workload

    body = {
        "op": "enroll",
        "netns": netns,
        "namespace": namespace,
        "service_account": service_account,
        "mode": mode,
    }
    try:
        reply = request(state_dir / AGENT_SOCKET, body)
    except AdminUnavailable:
        try:
            workload = make_workload(netns, namespace, service_account, mode)
            store = EnrollmentStore(state_dir)
            with store.locked():
                store.save(plan_enroll(store.load(), workload))
        except (EnrollmentError, NetnsError, ConfigError) as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(
            f"enrolled {workload.name} as {namespace}/{service_account} (recorded; the "
            "agent is not running, redirection starts when `agent run` starts)"
        )
        return
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    click.echo(
        f"enrolled {netns} as {namespace}/{service_account} in {reply['elapsed_ms']} ms "
        f"({reply['proxies']} proxy ack(s))"
    )


@main.command()
@click.argument("netns")
@state_dir_option
def unenroll(netns: str, state_dir: Path) -> None:
    """Stop redirecting NETNS and forget its enrollment."""
    try:
        reply = request(state_dir / AGENT_SOCKET, {"op": "unenroll", "netns": netns})
    except AdminUnavailable:
        path = Path(netns) if "/" in netns else NETNS_RUN_DIR / netns
        store = EnrollmentStore(state_dir)
        try:
            with store.locked():
                store.save(plan_unenroll(store.load(), str(path), netns))
        except EnrollmentError as exc:
            raise click.ClickException(str(exc)) from exc
        _remove_redirection([path], _config(None))
        click.echo(f"unenrolled {netns} (the agent is not running)")
        return
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    click.echo(f"unenrolled {netns}")


@main.command()
@state_dir_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the ferry.status/v1 document.")
def status(state_dir: Path, config_path: Path | None, as_json: bool) -> None:
    """Show enrollments, redirection read back from the kernel, and proxy health."""
    from agent.status import gather, render

    document = gather(_config(config_path), state_dir)
    click.echo(json.dumps(document, indent=2) if as_json else render(document))
    sys.exit(0 if document["healthy"] else 1)


def _all_netns() -> list[Path]:
    """Every network namespace on the host: named ones and those of running processes."""
    seen: dict[tuple[int, int], Path] = {}
    candidates = sorted(NETNS_RUN_DIR.glob("*")) if NETNS_RUN_DIR.is_dir() else []
    candidates += [Path(f"/proc/{pid}/ns/net") for pid in os.listdir("/proc") if pid.isdigit()]
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if is_netns_fd(fd):
                st = os.fstat(fd)
                seen.setdefault((st.st_dev, st.st_ino), path)
        finally:
            os.close(fd)
    return list(seen.values())


def _remove_redirection(paths: list[Path], config: Config) -> list[Path]:
    from agent.redirect.iptables import IptablesRedirection

    executor = NetnsExecutor()
    backend = IptablesRedirection(config.redirection, executor)
    cleaned = []
    try:
        for path in paths:
            try:
                if backend.installed(path):
                    backend.remove(path)
                    cleaned.append(path)
            except (OSError, NetnsError):
                continue  # the namespace went away meanwhile
    finally:
        executor.shutdown()
    return cleaned


@main.command()
@state_dir_option
@config_option
def cleanup(state_dir: Path, config_path: Path | None) -> None:
    """Remove everything Ferry installed: rules and routes in every netns, enrollments, and
    this node's entry in the mesh directory (node credentials, made by an operator, stay)."""
    config = _config(config_path)
    try:
        request(state_dir / AGENT_SOCKET, {"op": "status"}, timeout=5)
    except AdminUnavailable:
        pass
    else:
        raise click.ClickException(
            f"the agent is running on {state_dir}; stop it first (it would re-apply the rules)"
        )
    cleaned = _remove_redirection(_all_netns(), config)
    for path in cleaned:
        click.echo(f"removed redirection from {path}")
    store = EnrollmentStore(state_dir)
    directory = Path(config.mesh.directory or state_dir / "directory")
    published = directory / f"{config.node_name}.json"
    for leftover in (store.path, store.path.with_suffix(".tmp"), published):
        if leftover.exists():
            leftover.unlink()
            click.echo(f"removed {leftover}")
    click.echo(f"cleanup done: {len(cleaned)} network namespace(s) had Ferry redirection")
