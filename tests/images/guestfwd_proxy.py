"""qemu's `guestfwd=...-cmd:` target: one guest TCP connection on stdin/stdout, relayed to a
server of the test on 127.0.0.1 (qemu starts one of these per connection)."""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=30) as sock:
        sel = selectors.DefaultSelector()
        sel.register(0, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select(timeout=60):
                if key.fileobj == 0:
                    data = os.read(0, 65536)
                    if not data:
                        sock.shutdown(socket.SHUT_WR)
                        sel.unregister(0)
                        continue
                    sock.sendall(data)
                else:
                    data = sock.recv(65536)
                    if not data:
                        return
                    os.write(1, data)


if __name__ == "__main__":
    relay(sys.argv[1], int(sys.argv[2]))
