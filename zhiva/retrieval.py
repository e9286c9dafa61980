"""Plumbing shared by DICOM sources' retrievals."""
from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


def settle(done: Deferred, result) -> None:
    """Fire ``done`` with the retrieval's outcome unless a cancel already failed it."""
    if done.called:
        return
    if isinstance(result, Failure):
        done.errback(result)
    else:
        done.callback(result)
