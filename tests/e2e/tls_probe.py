"""Run inside a pod: open TLS to a tunnel port, optionally with a client certificate, and say
whether the peer proxy accepted us (its HTTP/2 SETTINGS arrive) or refused (alert / EOF).

    python tls_probe.py HOST PORT [CERT KEY]      -> prints "accepted" or "refused: <why>"
"""

import socket
import ssl
import sys

host, port = sys.argv[1], int(sys.argv[2])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE  # we probe the server's checks, not ours
context.minimum_version = ssl.TLSVersion.TLSv1_3
context.set_alpn_protocols(["h2"])
if len(sys.argv) == 5:
    context.load_cert_chain(sys.argv[3], sys.argv[4])
try:
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        data = tls.recv(9)
        print("accepted" if len(data) == 9 and data[3] == 0x04 else f"refused: got {data!r}")
except (OSError, ssl.SSLError) as exc:
    print(f"refused: {exc}")
