"""Redirection: steering a workload's TCP traffic to the proxy's in-pod listeners.

`rules` and `routing` decide, purely, what a pod's netfilter tables and policy routing should
hold, and `nft_rules` renders the same rules as one nftables table; `backend` is the small
interface the agent programs redirection through (and how one backend takes a pod over from
another); `iptables` (legacy tables, python-iptables), `nftables` (libnftables) and `ebpf` (bcc)
are the backends that program, read back and remove them inside the pod's network namespace;
`select` chooses one for the node (`redirection.backend`, `auto` decided by `detect`).

Import the submodules directly: this package imports nothing itself, so the pure rules load
without python-iptables, libnftables or pyroute2.
"""
