"""
Where the proxy's log goes: human-readable text by default, one JSON object
per line with ``--log-format=json``, rotated files with ``--log-dir``.

The observer is set on the twistd application (``ILogObserver`` component),
the way twistd lets an application choose its own logging.
"""
from __future__ import annotations

import sys
from pathlib import Path

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

LOG_FORMATS = ("text", "json")
ROTATE_BYTES = 50 * 1024 * 1024
KEEP_FILES = 10


def observer_for(log_format: str, log_dir: str | None) -> ILogObserver | None:
    """An observer for the options, or None to keep twistd's own (text to --logfile)."""
    if log_dir is None and log_format == "text":
        return None
    if log_dir is None:
        out = sys.stdout
    else:
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        name = "zhiva.json.log" if log_format == "json" else "zhiva.log"
        out = LogFile(name, str(directory), rotateLength=ROTATE_BYTES, maxRotatedFiles=KEEP_FILES)
    make = jsonFileLogObserver if log_format == "json" else textFileLogObserver
    return FilteringLogObserver(make(out), [LogLevelFilterPredicate(LogLevel.info)])
