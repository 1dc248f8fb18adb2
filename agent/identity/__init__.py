"""Workload identity: SPIFFE IDs, the root CA, node signing credentials, workload certificates.

`spiffe` formats and strictly parses `spiffe://<td>/ns/<ns>/sa/<sa>` (pure).  `ca` is the offline
part (`agent ca init` / `issue-node`): a name-constrained root per trust domain and an
intermediate per node.  `certs` is the online part: a node agent loads its `NodeSigner` and mints
short-lived ECDSA P-256 workload certificates, renewed at half their lifetime; `identity_of`
reads a verified peer's SPIFFE ID.  `cli` holds the `agent ca` commands.

Import the submodules directly: this package imports nothing itself, so a process that needs
only `spiffe` (the proxy workers) never loads `cryptography`.
"""
