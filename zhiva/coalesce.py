"""
Request coalescing: identical inference requests in flight at the same time
share one run (one PACS fetch, one model call) and all get its result bytes
or its error.

"Identical" is decided by the caller's key (the relay uses the model and
server configs, the route and the fetch plan, so requests started under
different configs never share). A waiter that leaves (the viewer hung up)
only cancels the run when it was the last one waiting; a run that ended is
forgotten at once, so the next request starts afresh.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_PENDING = object()


class SharedRun:
    """One run and the requests waiting for it."""

    def __init__(self, work: Deferred, forget: Callable[[SharedRun], None], context: Any = None) -> None:
        #: Whatever the starter wants followers to see (the relay: the run's Timings).
        self.context = context
        self._forget = forget
        self._waiters: list[Deferred] = []
        self._outcome: Any = _PENDING
        self._work = work
        work.addBoth(self._finished)

    @property
    def pending(self) -> bool:
        return self._outcome is _PENDING

    def join(self) -> Deferred:
        """A Deferred of the run's result; cancelling it only leaves the run."""
        d = Deferred(self._left)
        if self._outcome is not _PENDING:
            _fire(d, self._outcome)
        else:
            self._waiters.append(d)
        return d

    def _left(self, d: Deferred) -> None:
        if d in self._waiters:
            self._waiters.remove(d)
        if not self._waiters and self.pending:
            self._forget(self)  # nobody may join a run being cancelled
            self._work.cancel()

    def _finished(self, outcome) -> None:
        self._outcome = outcome
        self._forget(self)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            _fire(d, outcome)
        return None  # each waiter got it; nothing left unhandled here


def _fire(d: Deferred, outcome) -> None:
    if isinstance(outcome, Failure):
        d.errback(outcome)
    else:
        d.callback(outcome)


class Coalescer:
    """The shared runs in flight, by key."""

    def __init__(self) -> None:
        self._runs: dict[Hashable, SharedRun] = {}
        #: Requests that joined a run another request started.
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._runs)

    def join(self, key: Hashable, start: Callable[[], tuple[Deferred, Any]]) -> tuple[Deferred, SharedRun, bool]:
        """
        Join the run of ``key``, calling ``start()`` (returning the work's
        Deferred and its context) when there is none. Returns the waiter's
        Deferred, the run and whether this call started it.
        """
        run = self._runs.get(key)
        if run is not None:
            self.coalesced += 1
            return run.join(), run, False
        work, context = start()
        run = SharedRun(work, lambda done: self._forget(key, done), context)
        if run.pending:  # a run may also fail at once (a full queue)
            self._runs[key] = run
        return run.join(), run, True

    def _forget(self, key: Hashable, run: SharedRun) -> None:
        if self._runs.get(key) is run:
            del self._runs[key]
