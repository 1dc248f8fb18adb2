"""Hostile peers at issue 8's sizes: what each attack costs a proxy worker, and an innocent client.

The setup is the hostile-peer suite's (`tests/integration/test_hostile.py`, `Victim`): two pods
with the production rules, a worker each, the victim B's worker with the default `limits:` (short
header timeouts, `proxy.workers: 1`) and the machine's hard open-file limit; an innocent client
in pod A making echo round trips to B through both workers and the mTLS tunnel, during each
attack and after it; the attacker in pod A with its own address and, where it must be
authenticated, a valid workload certificate (floods of connections come from a process of
their own).  Per attack the table gives what the attacker got, B's worker peak RSS (above its
baseline before the attack, and 3 s after it ended), peak descriptors, CPU seconds, and the
innocent client's p50/p99 and failures during and after.

Then the node's capacity: 10,000 connections held at once from pod A's app (a separate
process) to an app in B, through A's worker and the mTLS tunnel into B's worker (one descriptor
a connection in each worker: this machine's hard open-file limit, 20,000 here, rules out 10,000
plaintext relays of 6 descriptors in one process), with both workers' descriptors and peak RSS
while they are held and what that is per connection.

The markdown table goes to stdout, progress to stderr.  Exit status 0 when every innocent round
trip succeeded and the connections were all held, 1 otherwise.  Namespaces, workers and sockets
are removed on exit, also on failure.

    sudo .venv/bin/python -m bench.hostile
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import LimitsConfig
from sim.attacks import Ended, HboneAttacker, Held, ProcessWatch, rss_mb, slowloris
from tests.integration.netns_pair import HTTP_PORT, REPO
from tests.integration.test_hostile import A_IP, B_IP, ROGUE_IP, STUCK_PORT, Attack, Victim

HELD = 10_000  # concurrent connections the node must hold (issue 8's target)
# the defaults, but short header timeouts and room for HELD tunnel streams from one identity
LIMITS = LimitsConfig(header_block_timeout=1.0, request_header_timeout=1.0,
                      connections_per_source=2 * HELD)  # fmt: skip
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # as much as this machine allows


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _authenticated(victim: Victim, flood: Callable[[HboneAttacker], object]) -> Callable[[], Any]:
    return lambda: victim.flood(flood, 10.0)


def _stuffing(victim: Victim) -> int:
    """100 streams x 4 MiB to an app that never reads: 25 connections of 4 streams."""
    attackers = [victim.attacker() for _ in range(25)]
    try:
        return sum(a.stuff(f"{B_IP}:{STUCK_PORT}", 4, 4 << 20) for a in attackers)
    finally:
        time.sleep(0.5)
        for a in attackers:
            a.close()


def _hold(victim: Victim, port: int, count: int, hold: float = 2.0, mark: bool = True,
          source: str = ROGUE_IP) -> Held:  # fmt: skip
    """`count` silent connections from pod A, in a process of their own (descriptors)."""
    argv = ["ip", "netns", "exec", victim.a, sys.executable, "-m", "sim.attacks", "hold", B_IP,
            str(port), str(count), str(hold), "--source", source,
            "--mark", str(victim.redirection.mark if mark else 0)]  # fmt: skip
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return Held(**json.loads(out.strip().splitlines()[-1]))


def attacks(victim: Victim) -> list[tuple[str, Callable[[], Any]]]:
    tunnel = victim.redirection.tunnel_port
    stuck = f"{B_IP}:{STUCK_PORT}"
    return [
        ("TLS handshake flood: 10,000 silent connections", lambda: _hold(victim, tunnel, 10_000)),
        ("PING flood, replies read: 20,000", _authenticated(victim, lambda a: a.pings(20_000))),
        ("PING flood, replies unread: 200,000",
         _authenticated(victim, lambda a: a.pings(200_000, read=False))),
        ("refused CONNECTs, answers unread: 20,000",
         _authenticated(victim, lambda a: a.requests("127.0.0.1:1", 20_000))),
        ("SETTINGS flood: 20,000", _authenticated(victim, lambda a: a.settings(20_000))),
        ("Rapid Reset: 20,000 HEADERS + RST_STREAM",
         _authenticated(victim, lambda a: a.rapid_reset(stuck, 20_000))),
        ("CONTINUATION flood: 2,000,000 empty frames",
         _authenticated(victim, lambda a: a.continuations(stuck, 2_000_000))),
        ("100 streams x 4 MiB to an app that never reads", lambda: _stuffing(victim)),
        ("plaintext connection flood: 10,000", lambda: _hold(victim, STUCK_PORT, 10_000)),
        ("slowloris on an inspected port",
         lambda: slowloris(victim.a_fd, (B_IP, HTTP_PORT), 0.05, 10.0, victim.redirection.mark,
                           ROGUE_IP)),
    ]  # fmt: skip


def _outcome(result: object) -> str:
    """What the attacker saw, in a few words."""
    match result:
        case Held(kept=kept, reset=reset, failed=failed):
            return f"{kept} held, {reset} reset, {failed} failed"
        case Ended(goaway=code, seconds=seconds, closed=closed):
            how = f"GOAWAY 0x{code:x}" if code is not None else "no GOAWAY"
            return f"{how}, closed after {seconds:.2f} s" if closed else f"{how}, still open"
        case int(sent):
            return f"{sent >> 20} MiB sent"
        case (str(status), float(took)):
            return f"{status or 'no answer'} after {took:.1f} s"
    return repr(result)


def _row(name: str, result: object, attack: Attack, after_mb: float) -> tuple[str, bool]:
    seen, during, after = attack.seen, attack.during, attack.after
    ok = during.failures == 0 and after.failures == 0
    return (
        f"| {name} | {_outcome(result)} | {seen.peak_rss_mb - attack.baseline_mb:+.0f} | "
        f"{after_mb - attack.baseline_mb:+.0f} | {seen.peak_fds} | {seen.cpu_seconds:.1f} | "
        f"{during.p50:.1f} / {during.p99:.1f} ({during.failures}) | "
        f"{after.p50:.1f} / {after.p99:.1f} ({after.failures}) |",
        ok,
    )


def capacity(victim: Victim) -> tuple[int, int, float, float]:
    """Hold HELD connections at once from pod A's app through both workers: (held, the two
    workers' peak descriptors, their RSS before and at the peak in MB)."""
    pids = (victim.pid_a, victim.pid_b)
    baseline = sum(rss_mb(pid) for pid in pids)
    watches = [ProcessWatch(pid, every=0.2).start() for pid in pids]
    try:
        held = _hold(victim, STUCK_PORT, HELD, 8.0, mark=False, source=A_IP)
    finally:
        seen = [w.stop() for w in watches]
    return held.kept, sum(s.peak_fds for s in seen), baseline, sum(s.peak_rss_mb for s in seen)


def main() -> int:
    rows: list[str] = []
    good = True
    with (
        tempfile.TemporaryDirectory(prefix="ferry-hostile-") as tmp,
        Victim(Path(tmp), LIMITS, NOFILE) as victim,
    ):
        for name, run in attacks(victim):
            _say(f"attack: {name}")
            attack = Attack(victim, seconds=5.0)
            result = attack(run)
            time.sleep(3.0)
            row, ok = _row(name, result, attack, rss_mb(victim.pid_b))
            if not victim.rules_intact():  # `agent cleanup` elsewhere on this machine
                row, ok = f"{row} pods' rules removed by another process: void |", False
            rows.append(row)
            good &= ok
        _say(f"holding {HELD} connections")
        held, fds, baseline, peak = capacity(victim)
        intact = victim.rules_intact()
    print("| attack | what the attacker got | worker peak RSS (MB over baseline) | RSS 3 s after |"
          " peak fds | CPU s | innocent p50 / p99 ms during (failures) | after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    per = (peak - baseline) * 1024 / max(held, 1)
    if not intact:
        print("\n(the pods' rules were removed by another process: the figures below are void)")
        good = False
    print(f"\nconcurrent connections held at bounded memory: {held} of {HELD} (target >= "
          f"10,000 per node) through both workers and the tunnel; their descriptors at the peak "
          f"{fds}, their RSS {baseline:.0f} MB -> {peak:.0f} MB "
          f"({per:.1f} KB a connection)")  # fmt: skip
    return 0 if good and held >= HELD else 1


if __name__ == "__main__":
    sys.exit(main())
