"""Simulated nodes and pods (network namespaces wired by the real CNI plugins) for tests."""

from sim.node import Link, Pod, SimError, SimNode, link_nodes

__all__ = ["Link", "Pod", "SimError", "SimNode", "link_nodes"]
