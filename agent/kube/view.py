"""The Kubernetes part of `agent status`: problems and lines from the agent's answer (pure).

The agent's status answer carries `kubernetes` (null off Kubernetes; see docs/status.md): the
pods on this node with the rule that applied and their redirection state, the health of every
watch, and of the annotation patches.  `problems` lists what an operator must act on: a kind
not listed yet or whose watch keeps failing (the agent acts on stale data meanwhile), patches
that fail, and pods that should be enrolled and are not (`failed`).  `lines` draws the section:
one line for the node, one per watch, then a row per pod with its state and why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def problems(kube: dict[str, Any]) -> list[str]:
    found = []
    for kind, watch in kube["watches"].items():
        error = f": {watch['last_error']}" if watch["last_error"] else ""
        if not watch["synced"]:
            found.append(f"kubernetes: {kind} not listed from the API server yet{error}")
        elif watch["failing"]:
            found.append(f"kubernetes: the {kind} watch is failing ({watch['errors']} error(s) "
                         f"so far){error}")  # fmt: skip
    annotations = kube["annotations"]
    if annotations["failing"]:
        found.append(f"kubernetes: annotating pods fails: {annotations['last_error']}")
    for pod in kube["pods"]:
        if pod["state"] == "failed":
            found.append(f"kubernetes: pod {pod['namespace']}/{pod['name']} should be enrolled "
                         f"and is not: {pod['reason']}")  # fmt: skip
    return found


def _watch(kind: str, watch: dict[str, Any], now: float, ago: Callable[[float], str]) -> str:
    if not watch["served"]:
        state = "not served by the API server (no CRD): none apply"
    elif not watch["synced"]:
        state = "NOT LISTED YET"
    else:
        last = f", last {ago(now - watch['last_event_at'])} ago" if watch["last_event_at"] else ""
        state = f"{'FAILING' if watch['failing'] else 'ok'}, {watch['events']} event(s){last}"
    return (f"        watch {kind}: {state}, {watch['relists']} relist(s), {watch['errors']} "
            f"error(s)")  # fmt: skip


def lines(kube: dict[str, Any], now: float, ago: Callable[[float], str]) -> list[str]:
    pods = kube["pods"]
    enrolled = sum(1 for p in pods if p["enrolled"])
    out = [f"Kubernetes  node {kube['node']}: {len(pods)} pod(s), {enrolled} enrolled"]
    out += [_watch(kind, watch, now, ago) for kind, watch in kube["watches"].items()]
    if not pods:
        return out
    rows = [("POD", "STATE", "WHY")]
    for p in pods:
        why = p["rule"] if p["state"] in (None, "enabled") else p["reason"]
        rows.append((f"{p['namespace']}/{p['name']}", p["state"] or "-", why))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    out += [f"  {r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2]}" for r in rows]
    return out
