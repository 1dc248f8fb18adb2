"""`agent policy validate FILE...`: exit status, one line per problem, and a light import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from agent.policy.cli import policy

HEAVY = ("cryptography", "pyroute2", "iptc", "asyncio")
GOOD = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "good", "namespace": "shop"},
    "spec": {"rules": [{}]},
}
DENY_HTTP = {
    **GOOD,
    "metadata": {"name": "deny-post"},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]},
}


def test_valid_files_and_directories_exit_0(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "b.policy").write_text(yaml.safe_dump(DENY_HTTP))
    result = CliRunner().invoke(
        policy, ["validate", str(tmp_path / "dir"), str(tmp_path / "b.policy")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok: 2 document(s) valid\n"
    assert result.stderr.startswith(
        f"warning: {tmp_path / 'b.policy'}: AuthorizationPolicy default/deny-post: "
    )


def test_problems_one_line_each_exit_1(tmp_path: Path) -> None:
    bad = {**GOOD, "spec": {"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"from": []}]}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all([bad, GOOD]))  # the good one is fine
    result = CliRunner().invoke(policy, ["validate", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1
    file = tmp_path / "p.yaml"
    assert result.stdout.splitlines() == [
        f"{file}: AuthorizationPolicy shop/good: spec.action: CUSTOM (external authorization "
        "through "
        "an extension provider) is not supported by Ferry; use ALLOW, DENY or AUDIT",
        f"{file}: AuthorizationPolicy shop/good: spec.rules[0].from: `from` must not be empty: "
        "omit "
        "it to match any",
    ]


def test_a_missing_file_is_a_problem(tmp_path: Path) -> None:
    result = CliRunner().invoke(policy, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 1
    assert result.stdout == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


def test_files_are_required() -> None:
    assert CliRunner().invoke(policy, ["validate"]).exit_code == 2


def loaded_by(code: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(result.stdout.split())


def test_importing_the_command_loads_only_click() -> None:
    modules = loaded_by("import agent.policy.cli")
    assert not {m.split(".")[0] for m in modules} & {*HEAVY, "yaml", "jsonschema"}


def test_validating_loads_nothing_heavy(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(GOOD))
    modules = loaded_by(
        "from agent.policy.cli import validate\n"
        f"try:\n    validate.main([{str(tmp_path / 'a.yaml')!r}])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code"
    )
    assert "agent.policy.documents" in modules
    assert not {m.split(".")[0] for m in modules} & set(HEAVY)
