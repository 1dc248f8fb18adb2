"""Redirection: steering a workload's TCP traffic to the proxy's in-pod listeners.

`rules` and `routing` decide, purely, what a pod's netfilter tables and policy routing should
hold; `iptables` is the backend that programs, reads back and removes them inside the pod's
network namespace.
"""

from agent.redirect.iptables import IptablesRedirection
from agent.redirect.routing import Routing, desired_routing
from agent.redirect.rules import (
    RedirectionError,
    RedirectionReport,
    Rule,
    RuleSet,
    desired_rules,
    render,
)

__all__ = [
    "IptablesRedirection",
    "RedirectionError",
    "RedirectionReport",
    "Routing",
    "Rule",
    "RuleSet",
    "desired_routing",
    "desired_rules",
    "render",
]
