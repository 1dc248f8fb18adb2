"""Runs one target under atheris: `python -m fuzz.targets.<name> [libFuzzer flags] [corpus dirs]`.

The target module has imported its parser already, so the functions loaded by then from Ferry
and from the libraries that parse for it (`PARSING`) are instrumented for coverage in place
(`atheris.instrument_all` would take every function of the process, which takes half a minute
to start), then libFuzzer drives `check`.  An exception that escapes `check` is a crash:
atheris prints it and libFuzzer writes the input to its `-artifact_prefix`.
"""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Callable

PARSING = ("agent", "fuzz", "h2", "hpack", "hyperframe", "yaml", "json", "ipaddress", "jsonschema")


def main(check: Callable[[bytes], None]) -> None:
    import atheris  # a dev dependency: imported only when a target runs under it
    from atheris.instrument_bytecode import instrument_func

    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and str(obj.__module__).partition(".")[0] in PARSING:
            instrument_func(obj)
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
