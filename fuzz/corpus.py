"""Writes every target's seeds into its corpus: `python -m fuzz.corpus [--target NAME[,NAME]]`.

`fuzz/corpus/<target>/seed-<label>` holds one seed each (`seeds()` of the target); seed files a
target no longer makes are removed, and `regress-*` files (inputs that once crashed a parser)
are kept as they are.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from fuzz.targets import chosen

CORPUS = Path(__file__).parent / "corpus"


def write(name: str) -> int:
    """Write one target's seeds; how many there are."""
    seeds: dict[str, bytes] = importlib.import_module(f"fuzz.targets.{name}").seeds()
    folder = CORPUS / name
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"seed-{label}": data for label, data in seeds.items()}
    for stale in folder.glob("seed-*"):
        if stale.name not in wanted:
            stale.unlink()
    for file, data in wanted.items():
        (folder / file).write_bytes(data)
    return len(wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="", help="comma-separated targets (default: all)")
    try:
        names = chosen(parser.parse_args().target)
    except ValueError as exc:
        parser.error(str(exc))
    for name in names:
        print(f"{name}: {write(name)} seeds in {CORPUS / name}")


if __name__ == "__main__":
    main()
