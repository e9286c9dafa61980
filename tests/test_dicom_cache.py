"""
The on-disk DICOM cache (zhiva/dicom_cache/) in front of a source the
test drives by hand: hits, TTL on a ``Clock``, LRU eviction, partial-write
recovery, concurrent fills, backpressure towards a slow disk. Disk I/O runs
in the cache's real threads; nothing here waits for a time to pass.
"""
from __future__ import annotations

import os
import stat
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from zhiva import dicom_cache
from zhiva.config import ServerConfig
from zhiva.dicom_cache import PARTIAL_PREFIX, SUFFIX, CachedSource, DicomCache
from zhiva.dicom_cache import files as dicom_files
from zhiva.errors import UpstreamError
from zhiva.interfaces import IInstanceConsumer, IRetrieval
from zhiva.selection import Target

SERVER = ServerConfig(key="11111111-1111-4111-8111-111111111111", uri="http://pacs.example/dicom-web")
SERIES = Target("1.2.3", "1.2.3.4")
OTHER = Target("1.2.3", "1.2.3.5")
THIRD = Target("1.2.3", "1.2.3.6")
TTL = 600.0


def dicom(size: int, seed: int = 0) -> bytes:
    """A Part 10-looking file: preamble, magic, then ``size`` bytes."""
    body = bytes((seed + i) % 251 for i in range(size))
    return b"\0" * 128 + b"DICM" + body


FILES = {
    SERIES: [dicom(3000, 1), dicom(2000, 2)],
    OTHER: [dicom(4000, 3)],
    THIRD: [dicom(4500, 4)],
}


@implementer(IRetrieval)
class HandRetrieval:
    """A retrieve the test plays the PACS for."""

    def __init__(self, target: Target, consumer) -> None:
        self.target = target
        self.consumer = consumer
        self.paused = False
        self.stopped = False
        self.sent = 0
        self.done: Deferred[int] = Deferred(lambda _: self.stopProducing())

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True

    def send(self, files: list[bytes], chunk: int = 1000) -> None:
        for data in files:
            self.consumer.instanceStarted()
            for i in range(0, len(data), chunk):
                self.consumer.instanceData(data[i : i + chunk])
                self.sent += min(chunk, len(data) - i)
            self.consumer.instanceEnded()

    def finish(self, count: int) -> None:
        self.done.callback(count)


class HandSource:
    """Every retrieve is recorded; with ``auto`` each one answers ``FILES`` on the next turn."""

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.retrievals: list[HandRetrieval] = []

    def retrieve(self, target: Target, consumer) -> HandRetrieval:
        retrieval = HandRetrieval(target, consumer)
        self.retrievals.append(retrieval)
        if self.auto:
            reactor.callLater(0, self._answer, retrieval)
        return retrieval

    def _answer(self, retrieval: HandRetrieval) -> None:
        if not retrieval.stopped:
            retrieval.send(FILES[retrieval.target])
            retrieval.finish(len(FILES[retrieval.target]))

    def close(self):
        return succeed(None)


@implementer(IInstanceConsumer)
class Files:
    def __init__(self, pause_after: int | None = None) -> None:
        self.files: list[bytes] = []
        self.chunks = 0
        self.retrieval = None
        self._pause_after = pause_after

    def instanceStarted(self) -> None:
        self.files.append(b"")

    def instanceData(self, data: bytes) -> None:
        self.files[-1] += data
        self.chunks += 1
        if self.chunks == self._pause_after:
            self.retrieval.pauseProducing()

    def instanceEnded(self) -> None:
        pass


@pytest.fixture
def caches(tmp_path):
    """Make caches on ``tmp_path/cache`` with a Clock; stopped at the end."""
    made: list[DicomCache] = []

    def make(**options) -> DicomCache:
        cache = DicomCache(tmp_path / "cache", ttl=options.pop("ttl", TTL), reactor=reactor, clock=Clock(), **options)
        cache.prepare()
        cache.startService()
        made.append(cache)
        return cache

    yield make
    for cache in made:
        if cache.running:
            cache.stopService()


def start(cache, source, target, server=SERVER, consumer=None):
    consumer = consumer or Files()
    retrieval = CachedSource(source, cache, server).retrieve(target, consumer)
    consumer.retrieval = retrieval
    return retrieval, consumer


async def fetch(cache, source, target, server=SERVER):
    retrieval, consumer = start(cache, source, target, server)
    count = await retrieval.done
    assert count == len(consumer.files)
    return consumer.files, retrieval.cached


async def idle(cache) -> None:
    """Until every fill is committed or deleted and every eviction is off the disk."""
    for _ in range(2000):
        stats = cache.stats()
        if not stats["filling"] and not stats["deleting"]:
            await cache.io(lambda: None)
            return
        await deferLater(reactor, 0.005)
    raise AssertionError("the cache never settled")


def on_disk(cache) -> list[str]:
    return sorted(os.listdir(cache.directory))


@pytest_twisted.ensureDeferred
async def test_second_retrieve_is_served_from_disk_without_the_source(caches):
    cache = caches()
    source = HandSource()

    first, was_cached = await fetch(cache, source, SERIES)
    second, now_cached = await fetch(cache, source, SERIES)

    assert first == second == FILES[SERIES]
    assert (was_cached, now_cached) == (False, True)
    assert len(source.retrievals) == 1
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    await idle(cache)
    (name,) = on_disk(cache)
    assert name.endswith(SUFFIX)
    assert stat.S_IMODE(os.stat(cache.directory / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache.directory).st_mode) == 0o700
    assert cache.stats()["bytes"] == os.stat(cache.directory / name).st_size


@pytest_twisted.ensureDeferred
async def test_key_holds_the_server_config(caches):
    cache = caches()
    source = HandSource()
    moved = ServerConfig(key=SERVER.key, uri="http://new-pacs.example/dicom-web")

    await fetch(cache, source, SERIES)
    await fetch(cache, source, SERIES, server=moved)
    _, cached = await fetch(cache, source, OTHER)

    assert len(source.retrievals) == 3 and cached is False


@pytest_twisted.ensureDeferred
async def test_a_hit_waits_while_the_consumer_is_paused(caches):
    cache = caches()
    cache.chunk_size = 500
    await fetch(cache, HandSource(), SERIES)
    retrieval, consumer = start(cache, HandSource(auto=False), SERIES, consumer=Files(pause_after=1))

    while consumer.chunks == 0:
        await deferLater(reactor, 0.005)
    for _ in range(20):  # plenty of turns for the reader, were it not paused
        await cache.io(lambda: None)
    assert consumer.chunks == 1 and not retrieval.done.called
    retrieval.resumeProducing()
    assert await retrieval.done == 2

    assert consumer.files == FILES[SERIES]
    assert consumer.chunks == sum(-(-len(f) // 500) for f in FILES[SERIES])


@pytest_twisted.ensureDeferred
async def test_ttl_on_the_reactor_clock(caches):
    cache = caches()
    source = HandSource()
    await fetch(cache, source, SERIES)

    cache.clock.advance(TTL - 1)
    _, cached = await fetch(cache, source, SERIES)
    assert cached is True
    cache.clock.advance(2)
    files, cached = await fetch(cache, source, SERIES)

    assert cached is False and files == FILES[SERIES]
    assert len(source.retrievals) == 2
    assert cache.stats()["evictions"]["expired"] == 1


@pytest_twisted.ensureDeferred
async def test_expired_entries_leave_the_disk_without_a_request(caches):
    cache = caches(ttl=30.0)
    await fetch(cache, HandSource(), SERIES)
    await idle(cache)
    assert len(on_disk(cache)) == 1

    cache.clock.advance(31)  # the sweep runs every min(ttl, 60) s
    await idle(cache)

    assert on_disk(cache) == [] and cache.stats()["entries"] == 0


@pytest_twisted.ensureDeferred
async def test_least_recently_used_entries_are_evicted_beyond_the_size_cap(caches):
    cache = caches(max_bytes=11_000)  # two entries of ~4-5 KB fit, three do not
    source = HandSource()
    for target in (SERIES, OTHER, SERIES):  # the last a hit: OTHER is now the least recently used
        await fetch(cache, source, target)
        await idle(cache)

    await fetch(cache, source, THIRD)
    await idle(cache)

    assert cache.stats()["evictions"]["size"] == 1
    assert len(on_disk(cache)) == 2 and cache.stats()["bytes"] <= 11_000
    assert (await fetch(cache, source, SERIES))[1] is True
    assert (await fetch(cache, source, THIRD))[1] is True
    assert (await fetch(cache, source, OTHER))[1] is False
    assert [r.target for r in source.retrievals] == [SERIES, OTHER, THIRD, OTHER]


@pytest_twisted.ensureDeferred
async def test_a_retrieve_larger_than_the_cache_is_relayed_but_not_kept(caches):
    cache = caches(max_bytes=3_000)
    source = HandSource()

    files, _ = await fetch(cache, source, SERIES)
    await idle(cache)
    again, cached = await fetch(cache, source, SERIES)

    assert files == again == FILES[SERIES] and cached is False
    assert len(source.retrievals) == 2
    await idle(cache)
    # The first fill gave up; the second retrieve did not even try (remembered for the TTL).
    assert on_disk(cache) == [] and cache.stats()["fills"] == {"committed": 0, "dropped": 1}


@pytest_twisted.ensureDeferred
async def test_a_failed_fill_leaves_nothing_behind(caches):
    cache = caches()
    source = HandSource(auto=False)
    retrieval, _ = start(cache, source, SERIES)
    await cache.ready()
    while not source.retrievals:
        await deferLater(reactor, 0.005)

    source.retrievals[0].send(FILES[SERIES][:1])
    source.retrievals[0].done.errback(UpstreamError("PACS server broke off"))
    with pytest.raises(UpstreamError):
        await retrieval.done
    await idle(cache)

    assert on_disk(cache) == []
    source.auto = True
    assert (await fetch(cache, source, SERIES))[1] is False


@pytest_twisted.ensureDeferred
async def test_a_cancelled_fill_leaves_nothing_behind(caches):
    cache = caches()
    source = HandSource(auto=False)
    retrieval, _ = start(cache, source, SERIES)
    while not source.retrievals:
        await deferLater(reactor, 0.005)
    source.retrievals[0].send(FILES[SERIES][:1])
    await cache.io(lambda: None)

    retrieval.stopProducing()  # the viewer hung up
    retrieval.done.addErrback(lambda _: None)
    await idle(cache)

    assert source.retrievals[0].stopped
    assert on_disk(cache) == [] and cache.stats()["entries"] == 0


@pytest_twisted.ensureDeferred
async def test_leftovers_of_a_crash_are_removed_and_never_served(caches, tmp_path):
    cache = caches()
    source = HandSource()
    await fetch(cache, source, SERIES)
    await fetch(cache, source, OTHER)
    await idle(cache)
    cache.stopService()
    names = on_disk(cache)
    truncated = cache.directory / names[0]
    truncated.write_bytes(truncated.read_bytes()[:-10])  # the footer is cut
    partial = cache.directory / f"{PARTIAL_PREFIX}{'0' * 64}.abcd1234"
    partial.write_bytes(dicom(100))  # a fill the crash interrupted

    restarted = caches()
    await restarted.ready()

    assert on_disk(restarted) == [names[1]]
    assert restarted.stats()["entries"] == 1 and restarted.stats()["evictions"]["invalid"] == 1
    source.retrievals.clear()
    hits = [(await fetch(restarted, source, target))[1] for target in (SERIES, OTHER)]
    assert sorted(hits) == [False, True]  # the damaged one fetched again, the other served
    assert len(source.retrievals) == 1


@pytest_twisted.ensureDeferred
async def test_an_entry_damaged_on_disk_is_fetched_again(caches):
    cache = caches()
    source = HandSource()
    await fetch(cache, source, SERIES)
    await idle(cache)
    (name,) = on_disk(cache)
    path = cache.directory / name
    data = bytearray(path.read_bytes())
    data[128:132] = b"XXXX"  # the first instance is no longer Part 10
    path.write_bytes(bytes(data))

    files, cached = await fetch(cache, source, SERIES)

    assert cached is False and files == FILES[SERIES]
    assert cache.stats()["evictions"]["invalid"] == 1
    await idle(cache)
    assert (await fetch(cache, source, SERIES))[1] is True


@pytest_twisted.ensureDeferred
async def test_concurrent_retrieves_of_one_key_share_one_fill(caches):
    cache = caches()
    source = HandSource(auto=False)
    first, one = start(cache, source, SERIES)
    second, two = start(cache, source, SERIES)
    while not source.retrievals:
        await deferLater(reactor, 0.005)
    await cache.io(lambda: None)
    assert len(source.retrievals) == 1  # the second waits for the first's fill

    source.retrievals[0].send(FILES[SERIES])
    source.retrievals[0].finish(2)

    assert await first.done == 2 and await second.done == 2
    assert one.files == two.files == FILES[SERIES]
    assert (first.cached, second.cached) == (False, True)
    assert len(source.retrievals) == 1


@pytest_twisted.ensureDeferred
async def test_when_the_fill_fails_a_waiting_retrieve_fetches_itself(caches):
    cache = caches()
    source = HandSource(auto=False)
    first, _ = start(cache, source, SERIES)
    second, two = start(cache, source, SERIES)
    while not source.retrievals:
        await deferLater(reactor, 0.005)

    source.retrievals[0].done.errback(UpstreamError("PACS server broke off"))
    with pytest.raises(UpstreamError):
        await first.done
    while len(source.retrievals) < 2:
        await deferLater(reactor, 0.005)
    source.retrievals[1].send(FILES[SERIES])
    source.retrievals[1].finish(2)

    assert await second.done == 2 and two.files == FILES[SERIES]
    await idle(cache)
    assert len(on_disk(cache)) == 1


@pytest_twisted.ensureDeferred
async def test_a_slow_disk_pauses_the_pacs_instead_of_buffering(caches, monkeypatch):
    cache = caches()
    cache.backlog_limit = 10_000
    gate = threading.Event()
    write = dicom_files.Writer.write

    def slow_write(self, chunks):
        gate.wait(30)
        write(self, chunks)

    monkeypatch.setattr(dicom_files.Writer, "write", slow_write)
    source = HandSource(auto=False)
    retrieval, consumer = start(cache, source, SERIES)
    try:
        while not source.retrievals:
            await deferLater(reactor, 0.005)
        pacs = source.retrievals[0]
        big = dicom(60_000)
        pacs.consumer.instanceStarted()
        sent = 0
        while not pacs.paused and sent < len(big):
            pacs.consumer.instanceData(big[sent : sent + 1000])
            sent += 1000

        assert pacs.paused  # the PACS was told to stop
        assert sent <= cache.backlog_limit + 2000  # held in memory: about the limit
        assert consumer.files[0] == big[:sent]  # the consumer still got everything sent
    finally:
        gate.set()
    while pacs.paused:  # the disk caught up: the PACS goes on
        await deferLater(reactor, 0.005)
    pacs.consumer.instanceData(big[sent:])
    pacs.consumer.instanceEnded()
    pacs.finish(1)
    assert await retrieval.done == 1
    await idle(cache)
    files, cached = await fetch(cache, source, SERIES)
    assert cached is True and files == [big]


def test_sizes_are_parsed_for_the_option():
    assert dicom_cache.parse_size("10G") == 10 << 30
    assert dicom_cache.parse_size("500MiB") == 500 << 20
    assert dicom_cache.parse_size("4096") == 4096
    for bad in ("", "ten", "-1G", "0"):
        with pytest.raises(ValueError):
            dicom_cache.parse_size(bad)


# -- end to end: viewer -> proxy (with --dicom-cache-dir) -> counting front -> real Orthanc --

E2E_SERVER = "11111111-1111-4111-8111-111111111111"
PREDICT = "aaaaaaaa-0000-4000-8000-000000000003"
SEGMENT = "aaaaaaaa-0000-4000-8000-000000000001"
STOW = "aaaaaaaa-0000-4000-8000-000000000002"  # dicom-multipart: the big series costs the model less


@pytest.fixture
def pacs_front(orthanc):
    from tests.support.counting import CountingFront

    front = CountingFront(reactor, orthanc.dicomweb)
    yield front
    pytest_twisted.blockon(front.close())


@pytest.fixture
def e2e(tmp_path, pacs_front, model_server):
    from tests.support.proxy import make_certificate, start_proxy, write_config

    levels = ["/studies", "/studies/series", "/studies/series/instances"]
    config = write_config(
        tmp_path / "config",
        {E2E_SERVER: {"uri": pacs_front.url, "isDefault": True}},
        {
            PREDICT: {"uri": model_server.url + "/prediction", "task": "prediction", "supports": levels},
            SEGMENT: {"uri": model_server.url + "/segmentation", "task": "segmentation", "supports": levels},
            STOW: {"uri": model_server.url + "/segmentation", "task": "segmentation", "supports": levels,
                   "protocol": "dicom-multipart"},
        },
    )
    certificate = make_certificate(tmp_path)
    running = []

    def start(*extra: str):
        proxy = start_proxy(reactor, config, *certificate, "--status-page", *extra)
        running.append(proxy)
        return proxy

    yield start
    for proxy in running:
        pytest_twisted.blockon(ensureDeferred(proxy.stop()))


def series_path(study, model: str, series: str) -> str:
    kind = "predictions" if model == PREDICT else "segmentations"
    return f"/{kind}/{model}/studies/{study.study_uid}/series/{series}"


@pytest_twisted.ensureDeferred
async def test_a_cached_series_makes_no_second_pacs_request(e2e, pacs_front, model_server, study, tmp_path):
    import json

    from twisted.logger import globalLogPublisher

    proxy = e2e("--dicom-cache-dir", str(tmp_path / "dicom-cache"))
    small = study.small_series_uid
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        first, body = await proxy.get(series_path(study, PREDICT, small))
        assert first.code == 200, body
        assert len(pacs_front.wado()) == 1
        seq = model_server.last()["seq"]

        again, again_body = await proxy.get(series_path(study, PREDICT, small))
        other, _ = await proxy.get(series_path(study, SEGMENT, small))  # another model, same series
    finally:
        globalLogPublisher.removeObserver(events.append)

    assert again.code == other.code == 200
    assert again_body == body
    assert len(pacs_front.wado()) == 1  # no PACS request after the first
    last = model_server.last()
    assert last["seq"] == seq + 2 and last["sops"] == study.series[small]  # the models were still called
    access = [e for e in events if e.get("log_namespace") == "zhiva.access" and e.get("status") == 200]
    assert [e["cache"] for e in access] == ["", "dicom", "dicom"]
    metrics = (await proxy.get("/metrics"))[1].decode()
    assert "zhiva_dicom_cache_hits_total 2.0" in metrics
    assert "zhiva_dicom_cache_misses_total 1.0" in metrics
    _, status = await proxy.get("/status")
    dicom = json.loads(status)["caches"]["dicom"]
    assert (dicom["hits"], dicom["misses"], dicom["entries"]) == (2, 1, 1)


@pytest_twisted.ensureDeferred
async def test_a_big_series_streams_from_the_cache_whole_and_in_order(e2e, pacs_front, model_server, study, tmp_path):
    proxy = e2e("--dicom-cache-dir", str(tmp_path / "dicom-cache"))
    big = study.big_series_uid

    first, body = await proxy.get(series_path(study, STOW, big))
    fetched = model_server.last()
    again, again_body = await proxy.get(series_path(study, STOW, big))
    served = model_server.last()

    assert first.code == again.code == 200 and again_body == body
    assert len(pacs_front.wado()) == 1
    assert served["seq"] == fetched["seq"] + 1
    assert served["sops"] == fetched["sops"] == study.series[big]
    assert served["body_bytes"] == fetched["body_bytes"]


@pytest_twisted.ensureDeferred
async def test_without_the_cache_every_request_goes_to_the_pacs(e2e, pacs_front, study):
    proxy = e2e()
    for _ in range(2):
        response, _ = await proxy.get(series_path(study, PREDICT, study.small_series_uid))
        assert response.code == 200

    assert len(pacs_front.wado()) == 2
    assert "zhiva_dicom_cache_hits_total" not in (await proxy.get("/metrics"))[1].decode()
