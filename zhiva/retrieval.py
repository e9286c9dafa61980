"""Plumbing shared by DICOM sources' retrievals."""
from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.python.failure import Failure


def settle(done: Deferred, result) -> None:
    """Fire ``done`` with the retrieval's outcome unless a cancel already failed it."""
    if done.called:
        return
    if isinstance(result, Failure):
        done.errback(result)
    else:
        done.callback(result)


class CoroutineRetrieval:
    """
    An ``IRetrieval`` whose work is one coroutine, ``_run``, that awaits only
    Deferreds of its own through ``_wait``: pausing holds it at the next
    ``_unpaused``, stopping cancels what it awaits. Subclasses set up their
    state, then call ``_start``.
    """

    def __init__(self) -> None:
        self._paused = False
        self._stopped = False
        self._resumed: Deferred[None] | None = None
        self._waiting: Deferred | None = None

    def _start(self) -> None:
        self._work = ensureDeferred(self._run())
        self.done: Deferred[int] = Deferred(lambda _: self.stopProducing())
        self._work.addBoth(lambda result: settle(self.done, result))

    async def _run(self) -> int:
        raise NotImplementedError

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._resumed is not None:
            resumed, self._resumed = self._resumed, None
            resumed.callback(None)

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stopping()
        # Only our own Deferreds are awaited, so cancelling is safe; when the
        # coroutine is running (inside a consumer call) it sees _stopped.
        if self._waiting is not None:
            self._waiting.cancel()

    def _stopping(self) -> None:
        """What a subclass stops besides the awaited Deferred."""

    async def _wait(self, d: Deferred):
        """Await ``d``; ``stopProducing`` cancels it."""
        self._check()
        self._waiting = d
        try:
            return await d
        finally:
            self._waiting = None

    def _check(self) -> None:
        if self._stopped:
            raise CancelledError()

    async def _unpaused(self) -> None:
        self._check()
        while self._paused:
            self._resumed = Deferred()
            await self._wait(self._resumed)
