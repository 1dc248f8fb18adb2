"""One module per fuzz target (see `fuzz`): `seeds()`, `check(data)`, and an atheris entry."""

from __future__ import annotations

import pkgutil
from pathlib import Path

NAMES = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])))


def chosen(spec: str) -> list[str]:
    """The targets a comma-separated list names, every one for ""; ValueError for unknown ones."""
    names = [name for name in spec.split(",") if name] or list(NAMES)
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        raise ValueError(f"no target {', '.join(unknown)}; the targets: {', '.join(NAMES)}")
    return names
