"""Ferry: a sidecar-free security data plane.

One `agent run` per node enrolls workloads (network namespaces) and programs redirection inside
them; one `agent proxy` per node holds sockets inside every enrolled namespace and relays the
redirected TCP traffic.  See README.md and docs/protocol.md.
"""

__version__ = "0.1.0"
