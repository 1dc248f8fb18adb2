"""Redirection: steering a workload's TCP traffic to the proxy's in-pod listeners.

`rules` and `routing` decide, purely, what a pod's netfilter tables and policy routing should
hold; `backend` is the small interface the agent programs redirection through; `iptables` is the
backend that programs, reads back and removes them inside the pod's network namespace.

Import the submodules directly: this package imports nothing itself, so the pure rules load
without python-iptables or pyroute2.
"""
