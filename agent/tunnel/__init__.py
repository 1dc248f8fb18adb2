"""Proxy-to-proxy tunnel: HBONE (HTTP/2 CONNECT) over mutual TLS 1.3.

The sans-IO core: `hbone` (`HboneConnection`: bytes in, events out), `events` (its events and its
two errors, `TunnelProtocolError` and `LocalProtocolError`), `frames` (the HTTP/2 wire format),
`headers` (header blocks and the CONNECT rules), `windows` (settings, flow control, stream
state), `floods` (the bounds on what a peer may make it do) and `authority` (`format_authority`,
`parse_authority`).  Over sockets, for the proxy worker: `tls` (SSL contexts from in-memory PEM,
the peer identity), `tlsbio` (TLS over memory BIOs), `connection` (`TunnelConn`, `Buffers`, the
`Host` protocol) and `stream` (`TunnelStream`).
"""
