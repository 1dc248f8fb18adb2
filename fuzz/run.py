"""Runs the atheris targets for a bounded time each and reports: `python -m fuzz.run`.

`--seconds N` per target (`make fuzz FUZZ_SECONDS=N`), `--target NAME[,NAME...]` for some of
them (`make fuzz TARGET=http1`).  Each target runs in its own process over its kept corpus
(`fuzz/corpus/<name>`, read only) and a working corpus (`fuzz/work/<name>`, where libFuzzer keeps
what it learns, so a second run starts from there); an input slower than 10 s or a process over
2 GiB is a finding too.  A crashing input is written to `fuzz/crashes/<name>-crash-<sha1>` and
the run goes on with the next target (libFuzzer stops a target at its first finding).  A table,
a row per target as it ends: executions, executions per second, working corpus size and
findings (0, or 1 and the input's file); the exit status is 1 if any target found something.
Logs: `fuzz/work/<name>.log`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzz.targets import chosen

ROOT = Path(__file__).parent
MAX_LEN = 16 * 1024  # bytes of one input; the seeds are smaller
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_WRITTEN = re.compile(r"Test unit written to (\S+)")


def run(name: str, seconds: int) -> tuple[int, float, int, str]:
    """Fuzz one target; (executions, seconds taken, working corpus size, findings)."""
    work, crashes = ROOT / "work" / name, ROOT / "crashes"
    work.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(exist_ok=True)
    command = [
        sys.executable,
        "-m",
        f"fuzz.targets.{name}",
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-max_len={MAX_LEN}",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
        str(work),
        str(ROOT / "corpus" / name),
    ]
    log = ROOT / "work" / f"{name}.log"
    start = time.monotonic()
    with log.open("w") as out:
        status = subprocess.run(command, cwd=ROOT.parent, stdout=out, stderr=out).returncode
    taken = time.monotonic() - start
    text = log.read_text(errors="replace")
    executed = sum(int(n) for n in _EXECUTED.findall(text))
    written = _WRITTEN.findall(text)
    if status == 0:
        outcome = "0"
    elif written:
        outcome = f"1  {written[-1]}"
    else:
        outcome = f"FAILED (exit {status}, see {log})"
    return executed, taken, sum(1 for _ in work.iterdir()), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--target", default="", help="comma-separated targets (default: all)")
    args = parser.parse_args()
    try:
        names = chosen(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"{'target':<18} {'executions':>12} {'exec/s':>8} {'corpus':>7}  findings", flush=True)
    found = False
    for name in names:
        executed, taken, corpus, outcome = run(name, args.seconds)
        found |= outcome != "0"
        rate = executed / taken if taken else 0.0
        print(f"{name:<18} {executed:>12,} {rate:>8,.0f} {corpus:>7}  {outcome}", flush=True)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
