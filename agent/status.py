"""`agent status`: what is enrolled, whether redirection is really in place, how the proxy does.

`gather` is the only part with effects: it reads the enrollment store, asks the agent and the
proxy over their admin sockets (either may be down: that is part of the answer), and reads the
redirection rules and addresses back from the kernel inside every enrolled namespace
(`read_back`).  A running agent does that read-back itself when asked (`"readback": true`: it has
the iptables and netlink libraries loaded already, so the command stays quick); only when the
agent is down does `gather` read the kernel itself, and only then does it need the configuration
(the running agent's answer names its node, its backend and why, and its trust domain; without
it, the backend is chosen here as the agent would choose it, `agent.redirect.select`).  The
agent is asked first, from a thread, so its read-back overlaps with loading the store and asking
the proxy; the enrollment modules are imported in that time too.  `assess` (pure) lists the
problems an operator must act on; `render` (pure) draws the table.  The JSON form (`--json`) is
the gathered document itself; its schema is `ferry.status/v1`, see docs/status.md.

Policy: the agent reports the version in force, where it came from, when it was loaded, the
errors of a rejected change, every `jwksUri` (last fetch, outcome, keys) and, per workload, the
documents that select it; the proxy reports, per worker, the version it enforces
(`policy_version`) and per flow the connections denied by reason (`denied_by`).  Each workload
row shows its labels, its documents and its denials by reason; a rejected change, a JWKS that
failed, a proxy that refused a policy and a worker behind the agent's version are problems.

Kubernetes (`kubernetes.enabled`): the agent reports the pods on its node, each with the rule that
applied and its redirection state, and the health of its watches; `agent.kube.view` draws that
section and names its problems (a watch not listed yet or failing, annotations failing, a pod
that should be enrolled and is not).

Limits: the proxy reports, per workload, the work it refused (or cut off) at each bound of
`limits:` (docs/limits.md) with the last peer that hit it and when (`shed`); each workload with
some gets a line under the table, and a bound hit in the last SHED_RECENT seconds is a problem:
the node is at a ceiling, and which workload and peer hit it is what an operator acts on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.admin import AGENT_SOCKET, PROXY_SOCKET, AdminUnavailable, request
from agent.kube import view as kubernetes_view

if TYPE_CHECKING:
    from agent.config import Config
    from agent.netns import NetnsExecutor
    from agent.redirect.backend import RedirectionBackend
    from agent.redirect.detect import Choice
    from agent.workloads import Workload

SCHEMA = "ferry.status/v1"
SHED_RECENT = 60.0  # seconds: a bound hit this recently makes the node unhealthy


def _ask(path: Path, body: dict[str, Any]) -> dict[str, Any]:
    try:
        reply = request(path, body, timeout=10.0)
    except (AdminUnavailable, OSError, ValueError) as exc:
        return {"running": False, "error": str(exc)}
    if not reply.get("ok"):
        return {"running": False, "error": str(reply.get("error"))}
    reply.pop("ok", None)
    reply["running"] = True
    return reply


def _addresses() -> list[str]:
    from pyroute2 import IPRoute  # loaded only when the kernel is read here

    with IPRoute() as ipr:
        return sorted(
            f"{dict(a['attrs'])['IFA_ADDRESS']}/{a['prefixlen']}"
            for a in ipr.get_addr()
            if a["scope"] == 0
            and dict(a["attrs"]).get("IFA_LABEL", "") != "lo"
            and not dict(a["attrs"])["IFA_ADDRESS"].startswith("fe80")
        )


def read_back(
    workload: Workload, backend: RedirectionBackend, executor: NetnsExecutor
) -> dict[str, Any]:
    """What the kernel holds for one workload: is its netns there, its addresses, its rules."""
    from agent.netns_id import current_id

    if current_id(workload.netns) != workload.netns_id:
        return {"netns_present": False, "ips": [], "redirection": "gone", "differences": []}
    report = backend.inspect(Path(workload.netns))
    return {
        "netns_present": True,
        "ips": executor.call(workload.netns, _addresses),
        "redirection": report.state,
        "differences": [*report.missing, *report.unexpected],
    }


def _read_locally(
    config: Config, choice: Choice, enrollments: dict[str, Workload], state_dir: Path
) -> dict[str, Any]:
    from agent.netns import NetnsExecutor
    from agent.redirect.select import make_backend  # kernel libraries: only here

    executor = NetnsExecutor()
    try:
        backend = make_backend(choice, config.redirection, executor, state_dir, read_only=True)
        return {uid: read_back(w, backend, executor) for uid, w in enrollments.items()}
    finally:
        executor.shutdown()


def _choose(config: Config) -> Choice:
    from agent.redirect.select import select_backend

    return select_backend(config.redirection)


def gather(state_dir: Path, load_config: Callable[[], Config]) -> dict[str, Any]:
    config = cache(load_config)  # read only if the agent does not answer for itself
    choice = cache(lambda: _choose(config()))  # likewise
    answers: dict[str, dict[str, Any]] = {}
    asking = threading.Thread(
        target=lambda: answers.update(
            agent=_ask(state_dir / AGENT_SOCKET, {"op": "status", "readback": True})
        ),
        name="ask-agent",
    )
    asking.start()
    try:
        from agent.workloads import EnrollmentStore

        store = EnrollmentStore(state_dir)
        with store.locked():
            enrollments = store.load()
        proxy = _ask(state_dir / PROXY_SOCKET, {"op": "status"})
    finally:
        asking.join()
    agent = answers["agent"]
    served: dict[str, Any] = proxy.pop("workloads", {}) if proxy["running"] else {}
    kernel: dict[str, Any] = agent.pop("readback", None) or {}
    missing = {uid: w for uid, w in enrollments.items() if uid not in kernel}
    if missing:
        kernel.update(_read_locally(config(), choice(), missing, state_dir))
    identity = agent.get("identity") or {"trust_domain": config().identity.trust_domain}
    workloads = []
    for uid, w in sorted(enrollments.items(), key=lambda kv: kv[1].name):
        flows = served.get(uid, {}).get("flows", [])
        entry: dict[str, Any] = {
            "name": w.name,
            "netns": w.netns,
            "namespace": w.namespace,
            "service_account": w.service_account,
            "labels": dict(w.labels),
            "identity": w.identity(identity["trust_domain"]),
            "ips": [],
            "netns_present": False,
            "redirection": "gone",
            "differences": [],
            "mode": agent.get("modes", {}).get(uid, served.get(uid, {}).get("mode")),
            "certificate": agent.get("identity", {}).get("certificates", {}).get(uid),
            "security": security_counts(flows),
            "denied_by": denials(flows),
            "shed": served.get(uid, {}).get("shed", []),
            "policies": (agent.get("policy") or {}).get("workloads", {}).get(uid),
            "served_by_proxy": uid in served,
            "listeners": served.get(uid, {}).get("listeners", []),
            "traffic": served.get(uid, {}).get("traffic", {}),
        }
        entry.update(kernel[uid])
        workloads.append(entry)
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": time.time(),
        "node": agent.get("node") or config().node_name,
        "backend": agent.get("backend") or choice().backend,
        "backend_reason": agent.get("backend_reason", "") if agent["running"] else choice().reason,
        "state_dir": str(state_dir),
        "agent": agent,
        "proxy": proxy,
        "workloads": workloads,
    }
    document["problems"] = assess(document)
    document["healthy"] = not document["problems"]
    return document


def security_counts(flows: list[dict[str, Any]]) -> dict[str, int]:
    """Connections relayed for a workload, by security (mtls / plaintext) and denied."""
    counts = {"mtls": 0, "plaintext": 0, "denied": 0}
    for flow in flows:
        security = str(flow.get("security", "plaintext"))
        counts[security] = counts.get(security, 0) + int(flow.get("connections_opened", 0))
        counts["denied"] += int(flow.get("denied", 0))
    return counts


def denials(flows: list[dict[str, Any]]) -> dict[str, int]:
    """Connections and requests denied for a workload, by reason (summed over its flows)."""
    counts: dict[str, int] = {}
    for flow in flows:
        for reason, count in (flow.get("denied_by") or {}).items():
            counts[reason] = counts.get(reason, 0) + int(count)
    return dict(sorted(counts.items()))


def policy_problems(agent: dict[str, Any]) -> list[str]:
    """What is wrong with the policy in force (pure): a rejected change, a JWKS without fresh
    keys, a proxy that refused the agent's policy."""
    policy = agent.get("policy")
    if not policy:
        return []
    problems = []
    rejected = policy.get("rejected")
    if rejected:
        problems += [
            f"policy change rejected, version {policy['version']} stays in force: {error}"
            for error in rejected["errors"]
        ]
    for uri, jwks in sorted((policy.get("jwks") or {}).items()):
        if jwks["outcome"] not in ("ok", "not fetched yet"):
            kept = (
                f"keeping {jwks['keys']} key(s) of the last good fetch"
                if jwks["keys"]
                else "no keys: every token of its issuer is rejected"
            )
            problems.append(f"jwks {uri}: {jwks['outcome']} ({kept})")
    for proxy in agent.get("proxies", []):
        if proxy.get("policy_error"):
            problems.append(f"proxy pid {proxy['pid']}: {proxy['policy_error']}")
    return problems


def assess(document: dict[str, Any]) -> list[str]:
    """Everything an operator must act on; empty when all is well."""
    problems = []
    agent, proxy = document["agent"], document["proxy"]
    if not agent["running"]:
        problems.append("agent is not running: enrollments are not reconciled (start `agent run`)")
    if not proxy["running"]:
        if document["workloads"]:
            problems.append(
                "proxy is not running: connections of enrolled workloads are refused "
                "(fail closed) until `agent proxy` runs"
            )
        else:
            problems.append("proxy is not running (start `agent proxy`)")
    elif not proxy.get("agent_connected"):
        problems.append("proxy is not connected to the agent")
    elif proxy.get("workers_alive", 0) < proxy.get("workers", 0):
        problems.append(f"only {proxy['workers_alive']} of {proxy['workers']} proxy workers alive")
    if agent["running"] and proxy["running"] and proxy.get("agent_connected"):
        problems += out_of_sync(agent, proxy)
    for problem in (agent.get("directory") or {}).get("problems", []):
        problems.append(f"mesh directory: {problem}")
    if agent["running"]:
        problems += policy_problems(agent)
    if agent["running"] and agent.get("kubernetes"):
        problems += kubernetes_view.problems(agent["kubernetes"])
    for w in document["workloads"]:
        label = f"{w['namespace']}/{w['name']}"
        if not w["netns_present"]:
            problems.append(f"{label}: network namespace {w['netns']} is gone")
            continue
        if w["redirection"] != "ok":
            problems.append(f"{label}: redirection is {w['redirection']}")
        cert = w.get("certificate")
        if cert and cert["not_after"] <= document["generated_at"]:
            problems.append(f"{label}: its certificate expired")
        for shed in w.get("shed") or []:
            ago = document["generated_at"] - shed["last_at"]
            if ago < SHED_RECENT:
                limit = shed["limit"]
                key = "LimitNOFILE" if limit == "open_files" else f"limits.{limit}"
                problems.append(
                    f"{label}: work refused at limit {limit} ({shed['count']} time(s), the last "
                    f"{_ago(ago)} ago from {shed['last_peer'] or 'an unknown peer'}; {key}, "
                    "docs/limits.md)"
                )
        if proxy["running"] and not w["served_by_proxy"]:
            problems.append(f"{label}: the proxy has no listeners for it")
        elif any(not lst.get("listening") for lst in w["listeners"]):
            problems.append(f"{label}: a proxy listener is not listening")
    return problems


def out_of_sync(agent: dict[str, Any], proxy: dict[str, Any]) -> list[str]:
    """Where a proxy worker has not applied what the agent sent (pure): the directory's version
    and size, the trust domain, each workload's certificate, the policy version."""
    problems = []
    directory = agent.get("directory") or {}
    policy = agent.get("policy") or {}
    identity = agent.get("identity") or {}
    sent_certs = {uid: c["not_after"] for uid, c in (identity.get("certificates") or {}).items()}
    for applied in proxy.get("applied", []):
        worker = f"proxy worker {applied['worker']}"
        if "version" in directory and (
            (applied["directory_version"], applied["directory_entries"])
            != (directory["version"], directory["entries"])
        ):
            problems.append(
                f"{worker} has directory version {applied['directory_version']} "
                f"({applied['directory_entries']} entries); the agent sent version "
                f"{directory['version']} ({directory['entries']} entries)"
            )
        if identity.get("enabled") and applied["trust_domain"] != identity.get("trust_domain"):
            problems.append(
                f"{worker} trusts {applied['trust_domain'] or 'no trust domain'!r}; the agent "
                f"sent {identity.get('trust_domain')!r}"
            )
        enforced = applied.get("policy_version")
        if "version" in policy and enforced is not None and enforced != policy["version"]:
            problems.append(
                f"{worker} enforces policy version {enforced}; the agent sent version "
                f"{policy['version']}"
            )
        held = applied.get("certificates", {})
        for uid, not_after in sorted(sent_certs.items()):
            if held.get(uid) != not_after:
                problems.append(f"{worker} does not hold the current certificate of {uid}")
    return problems


def _ago(seconds: float) -> str:
    """A duration the way an operator reads it: 42s, 5m, 24h, 300d."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _expiry(cert: dict[str, Any] | None, now: float) -> str:
    if not cert:
        return "no cert"
    left = cert["not_after"] - now
    return f"in {_ago(left)}" if left > 0 else "EXPIRED"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n}B"


def render(document: dict[str, Any]) -> str:
    """The human table (pure; golden-tested)."""
    now = document["generated_at"]
    agent, proxy = document["agent"], document["proxy"]
    why = f" ({document['backend_reason']})" if document.get("backend_reason") else ""
    lines = [
        f"Node {document['node']}   backend {document['backend']}{why}   "
        f"state {document['state_dir']}"
    ]
    if agent["running"]:
        last = agent.get("last_reconcile") or {}
        recon = "not yet"
        if last:
            actions = last.get("actions") or []
            recon = f"{_ago(now - last['at'])} ago, " + (
                f"{len(actions)} action(s)" if actions else "no changes"
            )
        watch = agent.get("loss_watch") or {}
        if watch.get("repairs"):  # lost redirection the watch put back between reconciles
            last = watch["last_repair"]
            recon += (f"   {watch['repairs']} loss repair(s), last {last['workload']} "
                      f"{_ago(now - last['at'])} ago")  # fmt: skip
        lines.append(
            f"Agent   running   v{agent['version']} pid {agent['pid']} "
            f"up {_ago(agent['uptime_seconds'])}   last reconcile {recon}"
        )
    else:
        lines.append("Agent   DOWN      " + agent.get("error", ""))
    if proxy["running"]:
        link = "agent connected" if proxy.get("agent_connected") else "AGENT NOT CONNECTED"
        lines.append(
            f"Proxy   running   v{proxy['version']} pid {proxy['pid']} "
            f"{proxy['workers_alive']}/{proxy['workers']} workers   {link}   "
            f"{proxy['active_connections']} active connection(s)"
        )
    else:
        lines.append("Proxy   DOWN      " + proxy.get("error", ""))
    directory = agent.get("directory") if agent["running"] else None
    if directory and "version" in directory:
        applied = proxy.get("applied", []) if proxy["running"] else []
        current = sum(
            1 for a in applied
            if (a["directory_version"], a["directory_entries"])
            == (directory["version"], directory["entries"])
        )  # fmt: skip
        skipped = f", {directory['skipped']} skipped" if directory.get("skipped") else ""
        lines.append(
            f"Mesh    directory version {directory['version']}, {directory['entries']} "
            f"address(es){skipped}   applied by {current}/{len(applied)} proxy worker(s)"
        )
    policy = agent.get("policy") if agent["running"] else None
    if policy:
        lines += _policy_lines(policy, proxy, now)
    identity = agent.get("identity") if agent["running"] else None
    if identity:
        if identity.get("enabled"):
            expires = identity["node_certificate_expires"]
            lines.append(
                f"Identity  trust domain {identity['trust_domain']}   node certificate expires "
                f"in {_ago(expires - now)}"
            )
        else:
            lines.append("Identity  none: no node credentials, traffic between nodes is plaintext")
    kube = agent.get("kubernetes") if agent["running"] else None
    if kube:
        lines += kubernetes_view.lines(kube, now, _ago)
    lines.append("")
    header = (
        "WORKLOAD",
        "IDENTITY",
        "MODE",
        "IPS",
        "REDIRECTION",
        "LISTENERS",
        "CERT EXPIRES",
        "MTLS/PLAIN",
        "DENIED",
        "CONNS OUT/IN",
        "BYTES OUT/IN",
    )
    rows: list[tuple[str, ...]] = [header]
    for w in document["workloads"]:
        listening = sum(1 for lst in w["listeners"] if lst.get("listening"))
        traffic = w["traffic"]
        out, inb = traffic.get("outbound", {}), traffic.get("inbound", {})

        def moved(d: dict[str, int]) -> int:
            return int(d.get("bytes_received", 0)) + int(d.get("bytes_sent", 0))

        rows.append(
            (
                w["name"],
                f"{w['namespace']}/{w['service_account']}",
                w.get("mode") or "-",
                ",".join(ip.split("/")[0] for ip in w["ips"]) or "-",
                w["redirection"],
                f"{listening}/{len(w['listeners'])}" if w["served_by_proxy"] else "none",
                _expiry(w.get("certificate"), now),
                f"{w['security']['mtls']}/{w['security']['plaintext']}",
                str(w["security"]["denied"]),
                f"{out.get('connections_opened', 0)}/{inb.get('connections_opened', 0)}",
                f"{_bytes(moved(out))}/{_bytes(moved(inb))}",
            )
        )
    if len(rows) == 1:
        lines.append(
            "No workloads enrolled (agent enroll NETNS --namespace NS --service-account SA)."
        )
    else:
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip())
    for w in document["workloads"]:
        lines += _workload_lines(w, now)
    lines.append("")
    if document["problems"]:
        lines.append("Problems:")
        lines.extend(f"  - {p}" for p in document["problems"])
    else:
        lines.append("All good.")
    return "\n".join(lines)


def _policy_lines(policy: dict[str, Any], proxy: dict[str, Any], now: float) -> list[str]:
    """The policy in force: version, source, documents, what the proxy workers enforce, JWKS."""
    loaded = f", loaded {_ago(now - policy['loaded_at'])} ago" if policy.get("loaded_at") else ""
    line = (
        f"Policy  version {policy['version']}, {policy['documents']} document(s) from "
        f"{policy['source']}{loaded}"
    )
    applied = proxy.get("applied", []) if proxy["running"] else []
    if any("policy_version" in a for a in applied):
        current = sum(1 for a in applied if a.get("policy_version") == policy["version"])
        line += f"   enforced by {current}/{len(applied)} proxy worker(s)"
    lines = [line]
    if policy.get("rejected"):
        errors = len(policy["rejected"]["errors"])
        lines.append(
            f"        a change was REJECTED {_ago(now - policy['rejected']['at'])} ago "
            f"({errors} error(s), see problems); version {policy['version']} stays in force"
        )
    for uri, jwks in sorted((policy.get("jwks") or {}).items()):
        fetched = (
            f"last good fetch {_ago(now - jwks['fetched_at'])} ago"
            if jwks.get("fetched_at")
            else "never fetched"
        )
        outcome = jwks["outcome"] if jwks["outcome"] == "ok" else f"FAILING: {jwks['outcome']}"
        lines.append(f"        jwks {uri}: {jwks['keys']} key(s), {fetched}, {outcome}")
    return lines


def _workload_lines(w: dict[str, Any], now: float) -> list[str]:
    """A workload's details under the table: rule differences, labels, policies, denials, work
    shed at a limit."""
    lines = [f"  {w['name']}: {diff}" for diff in w["differences"]]
    labels = w.get("labels") or {}
    if labels:
        lines.append(f"  {w['name']}: labels " + ",".join(f"{k}={v}" for k, v in labels.items()))
    if w.get("policies"):
        lines.append(f"  {w['name']}: policies " + ", ".join(w["policies"]))
    denied = w.get("denied_by") or {}
    if denied:
        lines.append(f"  {w['name']}: denied " + ", ".join(f"{r}={n}" for r, n in denied.items()))
    shed = w.get("shed") or []
    if shed:
        lines.append(f"  {w['name']}: shed " + ", ".join(
            f"{s['limit']}={s['count']} (last from {s['last_peer'] or 'unknown'}, "
            f"{_ago(now - s['last_at'])} ago)" for s in shed
        ))  # fmt: skip
    return lines
