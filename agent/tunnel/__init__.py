"""Proxy-to-proxy tunnel: HBONE (HTTP/2 CONNECT) over mutual TLS 1.3.

`hbone` is the sans-IO protocol core, `tls` builds SSL contexts from in-memory PEM and reads the
peer identity, `endpoint` drives both over non-blocking sockets for the proxy worker.
"""
