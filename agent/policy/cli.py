"""`agent policy ...`: policy commands that need no running agent.

`agent policy validate FILE...` checks policy documents the way the agent does before it accepts
them (`agent.policy.documents`: JSON Schema, then Istio's semantic validation), for CI pipelines:
each argument is a file (any name) or a directory (its `*.yaml`, `*.yml`, `*.json`); all are
checked together, so a duplicate (kind, namespace, name) across them is reported.  It prints one
line per problem, `file: kind ns/name: field: reason`, and exits 1 if there is any; warnings go
to stderr and never fail; with no problem it prints a one-line summary and exits 0.

This module imports only click: the validators (PyYAML, jsonschema) load when a command runs,
and nothing heavy (cryptography, pyroute2, iptc, asyncio) ever does.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.group(name="policy")
def policy() -> None:
    """API security policy (AuthorizationPolicy, RequestAuthentication, RateLimitPolicy)."""


@policy.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def validate(paths: tuple[Path, ...]) -> None:
    """Validate policy files and directories (no running agent needed); exit 1 on any problem."""
    from agent.policy.documents import load_files

    loaded = load_files(paths)
    for warning in loaded.warnings:
        click.echo(f"warning: {warning}", err=True)
    for error in loaded.errors:
        click.echo(str(error))
    if loaded.errors:
        raise SystemExit(1)
    click.echo(f"ok: {len(loaded.documents)} document(s) valid")
