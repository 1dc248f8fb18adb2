"""The bookkeeping of one list-then-watch loop (a reflector), as plain data (pure).

`Reflector` in `agent.kube.client` follows one kind the way client-go's reflector does:

    list  -> every object, and the collection's resourceVersion
    watch from that version (allowWatchBookmarks)  -> ADDED / MODIFIED / DELETED / BOOKMARK,
          each moving the version forward; the server ends a watch now and then: watch again
          from the last version seen
    410 Gone (the version fell out of the server's history)  -> list again (a relist), which is
          the only way to learn of deletions the watch missed
    any other error  -> wait `backoff` and watch again from the last version (list again if
          there is none yet)

`WatchHealth` is what it reports (for `agent status`): whether it has listed, events, relists,
errors (by count, the last one and when), the last event and the version.  `backoff` is bounded
exponential with full jitter over [delay/2, delay], so many agents that lost the API server
together do not come back in step.  `WatchHealth.failed` rate-limits error logs: the first
error of a streak, then at most one per `LOG_EVERY` seconds (with how many were not logged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BACKOFF_MIN = 0.2
BACKOFF_MAX = 30.0
LOG_EVERY = 30.0


def backoff(
    attempt: int, unit: float, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX
) -> float:
    """Seconds to wait before retry number `attempt` (1-based); `unit` in [0, 1) is the jitter."""
    delay = min(high, low * (1 << min(max(0, attempt - 1), 30)))
    return delay / 2 + delay / 2 * unit


@dataclass
class WatchHealth:
    kind: str
    synced: bool = False  # listed at least once
    served: bool = True  # False: the API server does not serve the kind (no CRD)
    events: int = 0
    relists: int = 0  # lists after the first (410 Gone)
    errors: int = 0
    last_error: str = ""
    last_error_at: float = 0.0
    last_event_at: float = 0.0
    resource_version: str = ""
    streak: int = 0  # errors since the last success
    unlogged: int = 0  # errors not logged since the last logged one
    logged_at: float = 0.0

    def listed(self, version: str, now: float, served: bool = True) -> None:
        if self.synced and served:
            self.relists += 1
        self.synced, self.served = True, served
        self.resource_version = version
        self.last_event_at = now
        self.streak = 0

    def event(self, version: str, now: float) -> None:
        self.events += 1
        self.resource_version = version or self.resource_version
        self.last_event_at = now
        self.streak = 0

    def failed(self, error: str, now: float) -> int | None:
        """Count an error.  Log it when this answers a number (how many errors were not logged
        since the last one that was); None: do not (see the module doc)."""
        self.errors += 1
        self.streak += 1
        self.last_error, self.last_error_at = error, now
        if self.streak == 1 or now - self.logged_at >= LOG_EVERY:
            self.logged_at = now
            suppressed, self.unlogged = self.unlogged, 0
            return suppressed
        self.unlogged += 1
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "synced": self.synced,
            "served": self.served,
            "events": self.events,
            "relists": self.relists,
            "errors": self.errors,
            "failing": self.streak > 0,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at or None,
            "last_event_at": self.last_event_at or None,
            "resource_version": self.resource_version,
        }
