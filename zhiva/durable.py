"""
The one step of a crash-safe file replace that Python has no call for: the
PACS token store (zhiva.state) and the DICOM cache both write a temporary
file, fsync it, rename it into place, then sync the directory.
"""
from __future__ import annotations

import os
from pathlib import Path


def sync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable; best effort (not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
