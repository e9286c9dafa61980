"""
systemd's ``sd_notify(3)`` for ``Type=notify``: one datagram per state change
to the socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
abstract socket). Without the variable nothing is sent. A send never blocks
(the socket is non-blocking: a full queue is dropped, not waited for) and never
raises; the first failure is logged once.
"""
from __future__ import annotations

import os
import socket
import time

from twisted.logger import Logger


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    log = Logger()

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._warned = False

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; True if it went out."""
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, target)
        except (OSError, ValueError) as e:
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "systemd notification to NOTIFY_SOCKET={address} failed ({error}); "
                    "further failures are not logged",
                    address=self.address,
                    error=getattr(e, "strerror", None) or str(e),
                )
            return False
        return True
