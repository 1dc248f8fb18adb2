"""The agent's own metrics and probes, on `agent.metrics_address` (default 127.0.0.1:15021).

`AgentTelemetry` is told what the agent did (`enrolled`: how long an enrollment took;
`reconciled`: each reconcile run, the state it observed per workload and the actions it took)
and `AgentCollector` reads the rest when scraped (the Kubernetes watches' errors and relists, a
rejected policy).  Served with `agent.telemetry.endpoints` from a thread of the agent:

    ferry_agent_workloads{state}                       workloads by redirection state, as the
                                                       last reconcile observed them
    ferry_agent_reconcile_runs_total
    ferry_agent_reconcile_actions_total{action,outcome} action: forget | repair | enroll_declared
    ferry_agent_enrollment_duration_seconds            histogram, from request to proxies acked
    ferry_agent_watch_errors_total{kind}, ferry_agent_watch_relists_total{kind}
    ferry_agent_policy_rejected                        1 while a policy document is rejected

/healthz answers 200 while the agent's event loop runs a task within PROBE_TIMEOUT; /readyz once
the first reconcile is done (workloads restored and checked), else 503 with why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from agent.reconcile import Observation, ReconcileAction
from agent.telemetry import endpoints
from agent.telemetry.counters import Observed

log = logging.getLogger("ferry.telemetry")

ENROLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROBE_TIMEOUT = 2.0  # seconds the event loop may take to run a probe's task


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class AgentTelemetry:
    def __init__(self) -> None:
        self.reconcile_runs = 0
        self.actions: dict[tuple[str, str], int] = {}  # (action, ok | failed) -> count
        self.states: dict[str, int] = {}
        self.enrollments = Observed(len(ENROLL_BUCKETS))

    def enrolled(self, seconds: float) -> None:
        self.enrollments.observe(ENROLL_BUCKETS, seconds)

    def reconciled(
        self,
        observed: Mapping[str, Observation],
        actions: Sequence[ReconcileAction],
        done: Sequence[str],
    ) -> None:
        """One reconcile run: what it saw and did (`done`: the lines it logged, FAILED: ...)."""
        self.reconcile_runs += 1
        states: dict[str, int] = {}
        for observation in observed.values():
            states[observation.redirection] = states.get(observation.redirection, 0) + 1
        self.states = states
        for action, line in zip(actions, done, strict=True):
            key = (_snake(type(action).__name__), "failed" if line.startswith("FAILED") else "ok")
            self.actions[key] = self.actions.get(key, 0) + 1


class AgentCollector(Collector):
    def __init__(
        self,
        telemetry: AgentTelemetry,
        watches: Callable[[], list[Any]],
        policy_rejected: Callable[[], bool],
    ) -> None:
        self.telemetry, self.watches, self.policy_rejected = telemetry, watches, policy_rejected

    def collect(self) -> Iterator[Any]:
        t = self.telemetry
        states = GaugeMetricFamily(
            "ferry_agent_workloads",
            "enrolled workloads by redirection state at the last reconcile",
            labels=["state"],
        )
        for state, count in sorted(t.states.items()):
            states.add_metric([state], count)
        yield states
        yield CounterMetricFamily(
            "ferry_agent_reconcile_runs", "reconcile runs", value=t.reconcile_runs
        )
        actions = CounterMetricFamily(
            "ferry_agent_reconcile_actions",
            "reconcile actions (repairs, forgotten, declared enrolled)",
            labels=["action", "outcome"],
        )
        for (action, outcome), count in sorted(t.actions.items()):
            actions.add_metric([action, outcome], count)
        yield actions
        histogram = HistogramMetricFamily(
            "ferry_agent_enrollment_duration_seconds", "enrollments, request to every proxy acked"
        )
        histogram.add_metric([], t.enrollments.cumulative(ENROLL_BUCKETS), t.enrollments.total)
        yield histogram
        errors = CounterMetricFamily(
            "ferry_agent_watch_errors", "Kubernetes watch errors", labels=["kind"]
        )
        relists = CounterMetricFamily(
            "ferry_agent_watch_relists", "Kubernetes relists (410 Gone)", labels=["kind"]
        )
        for health in self.watches():
            errors.add_metric([health.kind], health.errors)
            relists.add_metric([health.kind], health.relists)
        yield errors
        yield relists
        yield GaugeMetricFamily(
            "ferry_agent_policy_rejected",
            "1 while a policy document is rejected",
            value=1 if self.policy_rejected() else 0,
        )


def serve(
    address: tuple[str, int],
    collector: AgentCollector,
    loop: asyncio.AbstractEventLoop,
    ready: Callable[[], str],
) -> Any:
    """The agent's endpoints (None, logged, when the address is taken: the agent runs on)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)

    def alive() -> str:
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(PROBE_TIMEOUT)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return f"the agent's event loop did not run a task within {PROBE_TIMEOUT} s"
        return ""

    try:
        return endpoints.serve(address[0], address[1], registry, alive, ready)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.error("agent.metrics_address %s:%d is in use: no agent metrics or probes", *address)
        return None
