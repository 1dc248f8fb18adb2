"""Workload identity: SPIFFE IDs, the root CA, node signing credentials, workload certificates.

`spiffe` formats and strictly parses `spiffe://<td>/ns/<ns>/sa/<sa>` (pure).  `ca` is the offline
part (`agent ca init` / `issue-node`): a name-constrained root per trust domain and an
intermediate per node.  `certs` is the online part: a node agent loads its `NodeSigner` and mints
short-lived ECDSA P-256 workload certificates, renewed at half their lifetime; `identity_of`
reads a verified peer's SPIFFE ID.  `cli` holds the `agent ca` commands.
"""

from agent.identity.ca import init_ca, issue_node
from agent.identity.certs import NodeSigner, WorkloadCertificate, identity_of, renewal_due
from agent.identity.spiffe import IdentityError, SpiffeId, parse_spiffe_id, spiffe_id

__all__ = [
    "IdentityError",
    "NodeSigner",
    "SpiffeId",
    "WorkloadCertificate",
    "identity_of",
    "init_ca",
    "issue_node",
    "parse_spiffe_id",
    "renewal_due",
    "spiffe_id",
]
