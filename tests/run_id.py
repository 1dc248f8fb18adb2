"""The names of what this test run creates on the machine.

Every network namespace a test makes starts with `NAME_PREFIX` (`ferry-t<run id>-`), with a random
run id per pytest session, so two runs can share the machine and the session-end leak check
(`tests/conftest.py`) can tell this run's leftovers from anyone else's.
"""

from __future__ import annotations

import secrets

RUN_ID = secrets.token_hex(3)
SIM_PREFIX = f"t{RUN_ID}"  # `SimNode(SIM_PREFIX)` names its namespaces ferry-<prefix>-...
NAME_PREFIX = f"ferry-{SIM_PREFIX}-"


def netns_name(tag: str = "") -> str:
    """A fresh, unique namespace name of this run (`tag` is appended for readability)."""
    return f"{NAME_PREFIX}{secrets.token_hex(4)}{'-' + tag if tag else ''}"
