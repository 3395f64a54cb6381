"""A TCP proxy that can lose replies: the server goes away mid-request, as seen by a client."""

from __future__ import annotations

import contextlib
import socket
import threading


class DroppingProxy:
    """A TCP proxy in front of a server; with ``drop`` set it forwards requests but cuts the
    connection instead of passing the reply back (the server goes away mid-step). ``drop_next(n)``
    does that to the next ``n`` replies only."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.drop = threading.Event()
        self._pending = 0
        self.accepted = 0  # connections the client opened through the proxy
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for src, dst, reply in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, reply), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if reply and (self.drop.is_set() or self._take()):
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._pending = n

    def _take(self) -> bool:
        with self._lock:
            if self._pending:
                self._pending -= 1
                return True
            return False

    def close(self) -> None:
        self.listener.close()
