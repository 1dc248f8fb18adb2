"""The `agent` command line: run, proxy, enroll, unenroll, status, cleanup (and `ca`, `policy`).

Every command takes `--state-dir` (default /run/ferry) so several simulated nodes can share one
machine, and the commands that need settings take `--config` (YAML; the embedded default needs no
file).  Errors are printed as one line naming the bad value, with a non-zero exit code; nothing
is half-applied.

`enroll` and `unenroll` ask the running agent (its admin socket), which validates and applies.
Only when no agent runs, which they know by taking the agent's lock (`admin.agent_stopped`), do
they record the change in the enrollment store themselves, with the same validation
(`agent.workloads`); an agent that holds the lock but does not answer is an error, never a reason
to write behind its back.  These everyday commands import only what they need (click and the
admin client; the config, the enrollment checks and the kernel libraries only on the paths that
use them; `cryptography` never), so they answer quickly: a CNI plugin runs the same paths on
every pod start.

`agent cni install|uninstall` (`agent.cni_cli`) chains the CNI plugin into a node's CNI config;
it loads only when it is used, like `ca`.

`agent policy` (`agent.policy.cli`, with `validate`, which needs no agent) loads only when it is
used, like `ca`; `agent policy check` is added to it here: it asks the running agent (admin op
`policy_check`) to decide one connection or request for an enrolled workload with the policy in
force, prints the decision and the policy and rule that made it, and exits 0 (allow), 1 (deny)
or 2 (a usage error, or no agent to ask).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent import __version__
from agent.admin import AGENT_SOCKET, AdminUnavailable, AgentRunning, Reply, agent_stopped, request

if TYPE_CHECKING:
    from agent.config import Config

DEFAULT_STATE_DIR = Path("/run/ferry")

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
    from agent.config import ConfigError, load_config  # only for the commands that need it

    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def _one_line() -> Iterator[None]:
    """An operator's command fails with one line naming what was wrong, never a traceback."""
    try:
        yield
    except (ValueError, OSError, AgentRunning) as exc:
        raise click.ClickException(str(exc)) from None


def _ask_agent(state_dir: Path, body: dict[str, Any]) -> tuple[Reply | None, str]:
    """The agent's reply, or None and why there is none (it may still be running)."""
    try:
        return request(state_dir / AGENT_SOCKET, body), ""
    except (AdminUnavailable, OSError, ValueError) as exc:
        return None, str(exc) or type(exc).__name__


def _logging(verbose: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


class Commands(click.Group):
    """The command group; `ca` (and with it `cryptography`) loads only when it is used, so the
    daemons and the everyday commands stay small."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "ca", "cni", "policy"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "ca":
            from agent.identity.cli import ca

            return ca
        if cmd_name == "cni":
            from agent.cni_cli import cni

            return cni
        if cmd_name == "policy":
            from agent.policy.cli import policy

            policy.add_command(check)
            return policy
        return super().get_command(ctx, cmd_name)


@click.group(cls=Commands)
@click.version_option(__version__, prog_name="ferry agent")
def main() -> None:
    """Ferry: a sidecar-free security data plane (node agent and per-node proxy)."""


@main.command()
@state_dir_option
@config_option
@click.option(
    "--backend",
    metavar="auto|iptables|nftables|ebpf",
    default=None,
    help="Redirection backend (default: config redirection.backend). auto: eBPF when the kernel "
    "allows, else nftables when the host's rules are nft, else iptables. Pods enrolled under "
    "another backend are taken over (its rules removed).",
)
@click.option("-v", "--verbose", is_flag=True)
def run(state_dir: Path, config_path: Path | None, backend: str | None, verbose: bool) -> None:
    """Run the node agent: enroll workloads, program redirection, feed the proxy."""
    from agent.daemon import run_agent

    config = _config(config_path)
    origin = "redirection.backend"
    if backend is not None:
        from dataclasses import replace

        from agent.config import ConfigError, parse_config

        try:
            checked = parse_config({"redirection": {"backend": backend}}).redirection
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--backend") from exc
        config = replace(config, redirection=replace(config.redirection, backend=checked.backend))
        origin = "--backend"
    _logging(verbose)
    run_agent(config, state_dir, origin)


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
@click.option(
    "--upgrade",
    is_flag=True,
    help="Replace the running proxy without dropping a connection: start a new one in the "
    "background and return once it serves (exit 1 when it cannot: the running one serves on).",
)
@click.option("--report-fd", type=int, default=None, hidden=True)  # set by --upgrade
@click.option("-v", "--verbose", is_flag=True)
def proxy(
    state_dir: Path,
    config_path: Path | None,
    workers: int | None,
    metrics_address: str | None,
    upgrade: bool,
    report_fd: int | None,
    verbose: bool,
) -> None:
    """Run the per-node proxy (data plane).

    A proxy started while another runs on the state dir takes its listeners over and the old
    one drains its connections (proxy.drain_timeout); `--upgrade` does that in the background
    (systemd: `systemctl reload ferry-proxy`)."""
    from dataclasses import replace

    from agent.config import ConfigError, parse_config
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
    if upgrade:
        from agent.proxy.takeover import HandoffFailed, start_in_background

        argv = [sys.executable, "-m", "agent", "proxy", "--state-dir", str(state_dir)]
        argv += ["--config", str(config_path)] if config_path is not None else []
        argv += ["--workers", str(workers)] if workers is not None else []
        argv += ["--metrics-address", metrics_address] if metrics_address is not None else []
        argv += ["--verbose"] if verbose else []
        try:
            click.echo(start_in_background(argv, 3 * config.proxy.handoff_timeout + 15))
        except HandoffFailed as exc:
            raise click.ClickException(f"upgrade failed: {exc}") from None
        return
    _logging(verbose)
    workers = config.proxy.workers if workers is None else workers
    sys.exit(run_proxy(config, state_dir, workers, report_fd))


@main.command()
@click.argument("netns")
@click.option("--namespace", required=True, help="Kubernetes-style namespace of the workload.")
@click.option("--service-account", required=True, help="Service account the workload runs as.")
@click.option(
    "--mode",
    metavar="permissive|strict",
    default=None,
    help="permissive: plaintext inbound from non-mesh clients still accepted; strict: only "
    "tunnelled, authenticated inbound (default: mesh.namespace_modes, then mesh.default_mode).",
)
@click.option(
    "--label",
    "labels",
    metavar="KEY=VALUE",
    multiple=True,
    help="A label for policy selectors (repeatable), e.g. --label app=web --label version=v1.",
)
@state_dir_option
def enroll(
    netns: str,
    namespace: str,
    service_account: str,
    mode: str | None,
    labels: tuple[str, ...],
    state_dir: Path,
) -> None:
    """Enroll network namespace NETNS (a name under /var/run/netns, or a path)."""
    with _one_line():
        pairs = dict(_label(text) for text in labels)
        body = {
            "op": "enroll",
            "netns": netns,
            "namespace": namespace,
            "service_account": service_account,
            "mode": mode,
            "labels": pairs,
        }
        reply, why = _ask_agent(state_dir, body)
        if reply is None:
            name = _enroll_offline(state_dir, why, netns, namespace, service_account, mode, pairs)
            click.echo(
                f"enrolled {name} as {namespace}/{service_account} (recorded; the agent is not "
                "running, redirection starts when `agent run` starts)"
            )
            return
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    click.echo(
        f"enrolled {netns} as {namespace}/{service_account} in {reply['elapsed_ms']} ms "
        f"({reply['proxies']} proxy ack(s))"
    )


def _label(text: str) -> tuple[str, str]:
    """`--label KEY=VALUE`, checked by the agent's own rule (`agent.names`)."""
    from agent.names import label_assignment

    return label_assignment(text)


def _enroll_offline(
    state_dir: Path,
    why: str,
    netns: str,
    namespace: str,
    service_account: str,
    mode: str | None,
    labels: dict[str, str],
) -> str:
    """Record an enrollment while no agent runs: the agent's own checks, then the store."""
    from agent.netns import host_namespaces, resolve_netns
    from agent.workloads import EnrollmentStore, check_request, new_workload, plan_enroll

    check_request(namespace, service_account, mode, labels)
    path, netns_id = resolve_netns(netns)
    workload = new_workload(path, netns_id, namespace, service_account, mode, labels)
    store = EnrollmentStore(state_dir)
    refusal = f"the agent is running but did not answer: {why}"
    with agent_stopped(state_dir, refusal), store.locked():
        current = store.load()
        store.save(plan_enroll(current, workload, host_namespaces()).after(current))
    return workload.name


@main.command()
@click.argument("netns")
@state_dir_option
@config_option
def unenroll(netns: str, state_dir: Path, config_path: Path | None) -> None:
    """Stop redirecting NETNS (any name or path of it, or the name of one that is gone) and
    forget its enrollment."""
    with _one_line():
        reply, why = _ask_agent(state_dir, {"op": "unenroll", "netns": netns})
        if reply is None:
            removed = _unenroll_offline(state_dir, why, netns, config_path)
            detail = "" if removed else ", its network namespace is gone"
            click.echo(f"unenrolled {netns} (the agent is not running{detail})")
            return
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    click.echo(f"unenrolled {netns}")


def _unenroll_offline(state_dir: Path, why: str, netns: str, config_path: Path | None) -> bool:
    """Forget an enrollment while no agent runs, then remove its redirection (if reachable)
    with the configured route table and marks.  Returns whether there was a namespace."""
    from agent.netns import NetnsError, resolve_netns
    from agent.workloads import EnrollmentStore, find_enrollment, reach, without

    config = _config(config_path)
    try:
        path, live = resolve_netns(netns)
    except NetnsError:
        path, live = None, None
    store = EnrollmentStore(state_dir)
    with agent_stopped(state_dir, f"the agent is running but did not answer: {why}"):
        with store.locked():
            current = store.load()
            workload = find_enrollment(current, netns, live)
            store.save(without(current, workload.uid))
        target = reach(workload, path, live)
        if target is not None:
            try:
                _remove_redirection([target], config, state_dir, strict=True)
            except (ValueError, OSError) as exc:
                raise click.ClickException(
                    f"forgot the enrollment of {netns}, but removing its redirection from "
                    f"{target} failed: {exc} (retry with `agent cleanup`)"
                ) from None
    return target is not None


@main.command()
@state_dir_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the ferry.status/v1 document.")
def status(state_dir: Path, config_path: Path | None, as_json: bool) -> None:
    """Show enrollments, redirection read back from the kernel, and proxy health."""
    from agent.status import gather, render

    with _one_line():
        document = gather(state_dir, lambda: _config(config_path))
    click.echo(json.dumps(document, indent=2) if as_json else render(document))
    sys.exit(0 if document["healthy"] else 1)


@main.command()
@config_option
@click.option("--metrics-address", help="The proxy's host:port (default: proxy.metrics_address).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between frames.")  # fmt: skip
@click.option("--rows", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rows per table.")  # fmt: skip
@click.option("--once", is_flag=True, help="Print one frame (two samples an interval apart).")
def top(
    config_path: Path | None, metrics_address: str | None, interval: float, rows: int, once: bool
) -> None:
    """Live top talkers, error rates and recent denials of this node's proxy (Ctrl-C stops)."""
    import shutil

    from agent.top import ScrapeError, watch

    address = metrics_address or _config(config_path).proxy.metrics_address
    tty = sys.stdout.isatty()  # lines are cut to the terminal's width, never in a pipe or file
    try:
        watch(
            address,
            interval,
            once,
            rows,
            lambda: shutil.get_terminal_size().columns if tty else 1000,
        )
    except ScrapeError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo()


def _all_netns() -> list[Path]:
    """Every network namespace on the host: named ones and those of running processes."""
    import os

    from agent.linux import is_netns_fd
    from agent.netns_id import NETNS_RUN_DIR

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


def _remove_redirection(
    paths: list[Path], config: Config, state_dir: Path, strict: bool = False
) -> list[Path]:
    """Remove every backend's redirection from `paths` (with `config`'s route table and marks);
    the ones that had some.  A namespace that goes away meanwhile (a process's, which exited) is
    skipped, unless `strict`; a failure in a namespace that is still there is raised."""
    from agent.netns import NetnsExecutor
    from agent.netns_id import current_id
    from agent.redirect.select import every_backend

    executor = NetnsExecutor()
    cleaned = []
    try:
        backends = every_backend(config.redirection, executor, state_dir)
        for path in paths:
            try:
                if any(backend.installed(path) for backend in backends):
                    for backend in backends:
                        backend.remove(path)
                    cleaned.append(path)
            except (OSError, ValueError):  # RedirectionError, NetnsError
                if strict or current_id(path) is not None:
                    raise
    finally:
        executor.shutdown()
    return cleaned


@main.command()
@state_dir_option
@config_option
def cleanup(state_dir: Path, config_path: Path | None) -> None:
    """Remove everything Ferry installed: rules and routes in every netns, enrollments, and
    this node's entry in the mesh directory (node credentials, made by an operator, stay)."""
    from agent.config import node_name_of
    from agent.workloads import EnrollmentStore

    config = _config(config_path)
    refusal = f"the agent is running on {state_dir}; stop it first (it would re-apply the rules)"
    with _one_line(), agent_stopped(state_dir, refusal):
        node = node_name_of(config)
        cleaned = _remove_redirection(_all_netns(), config, state_dir)
        for path in cleaned:
            click.echo(f"removed redirection from {path}")
        from agent.redirect.probes import remove_host_rules

        remove_host_rules()  # the node's probe SNAT chain (Kubernetes)
        from agent.redirect.ebpf import cleanup as ebpf_cleanup

        if ebpf_cleanup(state_dir):
            click.echo(f"removed pinned eBPF programs, maps and links under {state_dir}")
        store = EnrollmentStore(state_dir)
        directory = Path(config.mesh.directory or state_dir / "directory")
        from agent.policy_store import POLICY_STATE

        policy = state_dir / POLICY_STATE
        for leftover in (store.path, store.tmp_path, policy, directory / f"{node}.json"):
            if leftover.exists():
                leftover.unlink()
                click.echo(f"removed {leftover}")
    click.echo(f"cleanup done: {len(cleaned)} network namespace(s) had Ferry redirection")


@click.command()
@click.argument("netns")
@click.option(
    "--from-principal",
    "principal",
    metavar="P",
    help="Source identity: spiffe://td/ns/NS/sa/SA or td/ns/NS/sa/SA (none: plaintext).",
)
@click.option("--from-ip", "source_ip", metavar="IP", help="Source address.")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="Destination port.")
@click.option("--method", metavar="M", help="HTTP method (any HTTP option makes it a request).")
@click.option("--path", metavar="P", help="HTTP request target (default /).")
@click.option("--host", metavar="H", help="HTTP Host / :authority.")
@click.option("--header", "headers", metavar="K=V", multiple=True, help="HTTP header (repeatable).")
@click.option("--jwt", "token", metavar="TOKEN", help="Sent as Authorization: Bearer TOKEN.")
@click.option("--json", "as_json", is_flag=True, help="Print the agent's answer as JSON.")
@state_dir_option
def check(
    netns: str,
    principal: str | None,
    source_ip: str | None,
    port: int,
    method: str | None,
    path: str | None,
    host: str | None,
    headers: tuple[str, ...],
    token: str | None,
    as_json: bool,
    state_dir: Path,
) -> None:
    """Decide a connection or request to enrolled workload NETNS with the policy in force.

    Exit 0 when allowed, 1 when denied, 2 on a usage error or when no agent answers."""
    if not principal and not source_ip:
        raise click.UsageError("give the source: --from-principal, --from-ip or both")
    pairs = {}
    for header in headers:
        name, equals, value = header.partition("=")
        if not equals or not name:
            raise click.BadParameter(f"{header!r} is not NAME=VALUE", param_hint="--header")
        pairs[name] = value
    body = {"op": "policy_check", "netns": netns, "from_principal": principal,
            "from_ip": source_ip, "port": port, "method": method, "path": path, "host": host,
            "headers": pairs, "jwt": token}  # fmt: skip
    reply, why = _ask_agent(state_dir, body)
    if reply is None or not reply.get("ok"):
        error = f"no agent answers ({why})" if reply is None else reply.get("error")
        click.echo(f"Error: {error}", err=True)
        sys.exit(2)
    click.echo(json.dumps(reply, indent=2) if as_json else render_check(reply))
    sys.exit(0 if reply["allowed"] else 1)


def render_check(reply: Reply) -> str:
    """The decision as an operator reads it (pure)."""
    verdict = "ALLOW" if reply["allowed"] else "DENY"
    lines = [f"{verdict}  {reply['workload']}   policy version {reply['version']}"]
    if reply["decided_by"] == "authentication":
        lines.append(f"  rejected by JWT authentication ({reply['status']}): {reply['reason']}")
    elif reply["policy"]:
        lines.append(
            f"  decided by AuthorizationPolicy {reply['policy']} rule {reply['rule']} "
            f"({reply['action']}: {reply['reason']})"
        )
    else:
        lines.append(f"  no policy decided ({reply['reason']})")
    jwt = reply.get("jwt")
    if jwt and reply["decided_by"] != "authentication":
        seen = f"token of {jwt['principal']}" if jwt["principal"] else jwt["reason"]
        lines.append(f"  JWT: {seen}")
    if reply["http_inspected_port"] and not reply["http"]:
        lines.append(
            "  this port is inspected as HTTP: the answer above is for traffic that is not HTTP "
            "(give --method or --path to check a request)"
        )
    if reply.get("audit"):
        lines.append(f"  audited by {', '.join(reply['audit'])}")
    documents = ", ".join(reply["policies"]) or "none"
    lines.append(f"  documents selecting the workload: {documents}")
    return "\n".join(lines)
