"""The per-model gate: bounded concurrency, a bounded queue, waits that end."""
from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from zhiva.errors import ServiceUnavailable
from zhiva.limits import ModelGate


def outcome(d):
    results = []
    d.addBoth(results.append)
    return results


def test_excess_waits_in_order_then_503_when_full():
    gate = ModelGate(Clock(), concurrency=2, queue=2, timeout=10, retry_after=7)
    first, second = outcome(gate.acquire("m")), outcome(gate.acquire("m"))
    third, fourth = outcome(gate.acquire("m")), outcome(gate.acquire("m"))
    fifth = outcome(gate.acquire("m"))
    assert first == [None] and second == [None] and third == [] and fourth == []
    (failure,) = fifth
    assert failure.check(ServiceUnavailable)
    assert failure.value.headers == {"Retry-After": "7"}
    assert "queue is full" in failure.value.detail
    assert outcome(gate.acquire("other")) == [None]  # models do not share slots
    gate.release("m")
    assert third == [None] and fourth == []
    gate.release("m")
    gate.release("m")
    gate.release("m")
    assert fourth == [None]
    assert gate.active("m") == 0 and gate.waiting("m") == 0


def test_wait_times_out_and_cancel_leaves_the_queue():
    clock = Clock()
    gate = ModelGate(clock, concurrency=1, queue=5, timeout=3, retry_after=30)
    gate.acquire("m")
    cancelled = gate.acquire("m")
    timed = outcome(gate.acquire("m"))
    cancelled.cancel()
    with pytest.raises(CancelledError):
        cancelled.result.raiseException()
    cancelled.addErrback(lambda _: None)
    assert gate.waiting("m") == 1
    clock.advance(3)
    (failure,) = timed
    assert failure.check(ServiceUnavailable) and "waited 3 s" in failure.value.detail
    assert gate.waiting("m") == 0 and not clock.getDelayedCalls()
    gate.release("m")
    assert gate.active("m") == 0
