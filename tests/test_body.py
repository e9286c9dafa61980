"""
The model request body in memory: what the model receives is exactly the
zhiva-json of SPEC.md, nothing reaches the model for an empty selection, and
a slow model holds the PACS back instead of making the proxy buffer.
"""
from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from zhiva.body import PlanBody
from zhiva.errors import NotFound, UpstreamError
from zhiva.interfaces import IDicomSource, IRetrieval
from zhiva.plugins.zhiva_json import protocol
from zhiva.selection import Filter, Route, Target, plan

CHUNK = 1000


@implementer(IRetrieval)
class FakeRetrieval:
    """Streams ``files`` one chunk per ``step()``, unless paused."""

    def __init__(self, files: list[bytes], consumer, chunk: int = CHUNK) -> None:
        self.chunks: list[tuple[str, bytes]] = []
        for data in files:
            self.chunks.append(("start", b""))
            self.chunks += [("data", data[i : i + chunk]) for i in range(0, len(data), chunk)]
            self.chunks.append(("end", b""))
        self.consumer = consumer
        self.paused = False
        self.stopped = False
        self.done: Deferred[int] = Deferred()
        self.count = len(files)

    def step(self) -> bool:
        if self.paused or self.stopped or self.done.called:
            return False
        if not self.chunks:
            self.done.callback(self.count)
            return True
        kind, data = self.chunks.pop(0)
        {"start": lambda: self.consumer.instanceStarted(),
         "data": lambda: self.consumer.instanceData(data),
         "end": lambda: self.consumer.instanceEnded()}[kind]()
        return True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IDicomSource)
class FakeSource:
    def __init__(self, files_by_target: dict[Target, list[bytes]], chunk: int = CHUNK) -> None:
        self.files = files_by_target
        self.chunk = chunk
        self.retrievals: list[FakeRetrieval] = []

    def retrieve(self, target, consumer):
        retrieval = FakeRetrieval(self.files.get(target, []), consumer, self.chunk)
        self.retrievals.append(retrieval)
        return retrieval

    def run(self, limit: int = 100000) -> None:
        """Turn the crank until nothing moves."""
        for _ in range(limit):
            if not any(r.step() for r in self.retrievals):
                return

    def close(self):
        return None


@implementer(IConsumer)
class SlowModel:
    """A consumer that pauses its producer once ``window`` bytes are unread."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.unread = 0
        self.received: list[bytes] = []
        self.producer = None
        self.max_unread = 0

    def write(self, data: bytes) -> None:
        self.received.append(data)
        self.unread += len(data)
        self.max_unread = max(self.max_unread, self.unread)
        if self.unread >= self.window:
            self.producer.pauseProducing()

    def read_all(self) -> None:
        self.unread = 0
        self.producer.resumeProducing()

    def body(self) -> bytes:
        return b"".join(self.received)


STUDY_UID, SERIES_A, SERIES_B = "1.2.3", "1.2.3.1", "1.2.3.2"


def _files(n: int, size: int, seed: int = 0) -> list[bytes]:
    return [bytes((seed + i + j) % 256 for j in range(size)) for i in range(n)]


def _start(route, filters, files_by_target, window=1 << 30, chunk=CHUNK):
    the_plan = plan(route, filters)
    source = FakeSource(files_by_target, chunk)
    body = PlanBody(the_plan, protocol.encoder(the_plan), source)
    primed = body.prime()
    source.run()
    model = SlowModel(window)
    model.producer = body
    return body, source, model, primed


def test_plain_list_body_is_the_zhiva_json_of_the_series():
    files = _files(3, 2500)
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    body, source, model, primed = _start(route, (), {Target(STUDY_UID, SERIES_A): files})
    assert primed.called

    finished = body.startProducing(model)
    source.run()

    assert finished.called
    expected = json.dumps([json.dumps(list(f), separators=(",", ":")) for f in files], separators=(",", ":"))
    assert model.body() == expected.encode()
    assert json.loads(model.body()) == [json.dumps(list(f), separators=(",", ":")) for f in files]


def test_filtered_study_body_matches_the_spec_shape():
    a, b = _files(2, 1500, 1), _files(1, 700, 2)
    route = Route("predictions", "m", Target(STUDY_UID))
    filters = (
        Filter("ct", SERIES_A),
        Filter("pair", SERIES_B, (Filter("only", "1.2.3.2.1"),)),
    )
    files = {Target(STUDY_UID, SERIES_A): a, Target(STUDY_UID, SERIES_B, "1.2.3.2.1"): b}
    body, source, model, _ = _start(route, filters, files)

    body.startProducing(model)
    source.run()

    enc = lambda f: json.dumps(list(f), separators=(",", ":"))  # noqa: E731
    assert json.loads(model.body()) == {
        "ct": {"data": [enc(f) for f in a]},
        "pair": {"data": {"only": {"data": enc(b[0])}}},
    }


def test_empty_selection_never_reaches_the_model():
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    body, source, model, primed = _start(route, (), {})

    failure = []
    primed.addErrback(failure.append)

    assert failure and failure[0].check(NotFound)
    assert model.received == []


def test_a_single_instance_filter_refuses_several_instances():
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    files = {Target(STUDY_UID, SERIES_A, "1.5"): _files(2, 300)}
    body, source, model, primed = _start(route, (Filter("x", "1.5"),), files)
    failures = []
    primed.addErrback(failures.append)
    if not failures:
        finished = body.startProducing(model)
        source.run()
        finished.addErrback(failures.append)

    assert failures[0].check(UpstreamError)
    assert "2 instances" in failures[0].value.detail


@pytest.mark.parametrize("window", [4096, 65536])
def test_a_slow_model_pauses_the_pacs_instead_of_buffering(window):
    files = _files(20, 50_000)
    total_json = sum(len(json.dumps(list(f), separators=(",", ":"))) for f in files)
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    body, source, model, _ = _start(route, (), {Target(STUDY_UID, SERIES_A): files}, window)
    finished = body.startProducing(model)

    rounds = 0
    while not finished.called:
        source.run()
        assert source.retrievals[0].paused or finished.called
        model.read_all()
        rounds += 1

    # Never more unread than the window plus one encoded chunk of the PACS.
    assert model.max_unread < window + 4 * CHUNK + 16
    assert rounds > total_json // (window + 4 * CHUNK)
    assert len(model.body()) == total_json + len(files) * 3 + 1


def test_a_big_pacs_chunk_reaches_a_paused_model_piece_by_piece():
    """
    One 1 MiB read from the PACS is ~3.6 MiB of zhiva-json: a paused model
    gets none of the rest until it reads, and never more than one 64 KiB
    slice's encoding (~256 KiB) over its window.
    """
    window = 65536
    files = [bytes(range(256)) * 4096 * 2]  # 2 MiB, read in 1 MiB chunks
    route = Route("predictions", "m", Target(STUDY_UID, SERIES_A))
    body, source, model, _ = _start(route, (), {Target(STUDY_UID, SERIES_A): files}, window, chunk=1 << 20)
    finished = body.startProducing(model)
    while not finished.called:
        source.run()
        model.read_all()

    assert model.max_unread < window + 4 * 65536 + 16
    assert max(map(len, model.received)) <= 4 * 65536
    assert model.body() == b'["' + json.dumps(list(files[0]), separators=(",", ":")).encode() + b'"]'
