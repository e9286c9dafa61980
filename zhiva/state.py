"""
State kept across restarts in the ``--state-dir`` directory (the Docker image
mounts a volume there): small JSON files that only the service user can read,
each replaced atomically so a crash never leaves half a file.

Without ``--state-dir`` nothing is kept and every start signs in afresh.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.logger import Logger

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


class StateDir:
    """One directory of named JSON documents."""

    log = Logger()

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def prepare(self) -> None:
        """
        Create the directory (owner-only) if missing; raise ``OSError`` when
        it cannot be written. An existing directory's mode is left alone: a
        mounted volume's owner decides it.
        """
        self.path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable by this user", str(self.path))

    def read(self, name: str) -> dict[str, Any] | None:
        """The document ``name``, or None when absent or unreadable (logged)."""
        path = self.path / name
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            self.log.warn("State file {path} cannot be read ({error}); ignoring it", path=str(path), error=str(e))
            return None
        try:
            value = json.loads(text)
        except ValueError:
            self.log.warn("State file {path} is not valid JSON; ignoring it", path=str(path))
            return None
        return value if isinstance(value, dict) else None

    def write(self, name: str, value: dict[str, Any]) -> None:
        """
        Replace the document ``name`` with ``value``: written to a temporary
        file of mode 0600 in the same directory, then renamed over the old
        one. Raises ``OSError``.

        Not fsynced: this runs on the reactor thread, where an fsync may
        stall every request for as long as a slow disk takes, and what a
        power cut can cost is one sign-in (a torn file is ignored as malformed).
        """
        self.prepare()
        data = json.dumps(value, sort_keys=True).encode("utf-8")
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.path)
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp's default, stated rather than assumed
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temporary, self.path / name)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)
