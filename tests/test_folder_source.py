"""
The folder source: a directory tree of Part 10 files answers retrieves as a
DICOMweb PACS would, byte for byte, skips junk with one warning per file,
honours pause/stop and picks up new files on refresh.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from zhiva import config, registry
from zhiva.config import ServerConfig
from zhiva.errors import NotFound, UpstreamError
from zhiva.interfaces import IDicomSource, IDicomSourceFactory, IInstanceConsumer, IRetrieval
from zhiva.plugins.folder import check_uri, folder, read_header
from zhiva.selection import Target

KEY = "0b7d7e0c-4f7e-4c55-9d0a-6f1a2b3c4d5e"
MISSING = "1.2.3.4.5.6.7.8.9"


@implementer(IInstanceConsumer)
class Collector:
    """Keeps every delivered instance whole; ``on_data`` hooks each chunk."""

    def __init__(self) -> None:
        self.instances: list[bytes] = []
        self.current: list[bytes] | None = None
        self.chunks = 0
        self.on_data = None

    def instanceStarted(self) -> None:
        assert self.current is None, "instanceStarted twice"
        self.current = []

    def instanceData(self, data: bytes) -> None:
        assert self.current is not None, "data outside an instance"
        assert data
        self.current.append(data)
        self.chunks += 1
        if self.on_data is not None:
            self.on_data(self)

    def instanceEnded(self) -> None:
        assert self.current is not None
        self.instances.append(b"".join(self.current))
        self.current = None


class Warnings:
    """Warnings logged about anything under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.events: list[dict] = []

    def __call__(self, event: dict) -> None:
        if event.get("log_level") is LogLevel.warn and self.root in (formatEvent(event) or ""):
            self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


@pytest.fixture
def warnings(tmp_path):
    observer = Warnings(tmp_path)
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def tree(study, tmp_path) -> Path:
    """
    The small series spread over nested folders (reverse name order, so
    delivery order must come from InstanceNumber), plus junk.
    """
    root = tmp_path / "pacs"
    small = study.series_files(study.small_series_uid)
    places = [root / "b" / "deep" / "z.dcm", root / "a" / "y", root / "x.dcm"]
    for src, dst in zip(small, places):
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    junk = root / "junk"
    junk.mkdir()
    (junk / "README.txt").write_text("not DICOM at all\n")
    big = study.paths[study.series[study.big_series_uid][0]].read_bytes()
    (junk / "cut-in-pixels.dcm").write_bytes(big[:5000])  # an interrupted copy
    (junk / "cut-in-header.dcm").write_bytes(big[:300])
    # A valid dataset written without preamble and file meta (not Part 10).
    ds = pydicom.dcmread(small[0])
    ds.SOPInstanceUID = study.small_series_uid + ".99"
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(junk / "raw.dcm", ds, enforce_file_format=False, implicit_vr=True)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "ignored").write_text("dot folders are not walked")
    (root / ".DS_Store").write_bytes(b"\0\1junk")
    return root


JUNK = ("README.txt", "cut-in-pixels.dcm", "cut-in-header.dcm", "raw.dcm")


def open_source(root: Path, key: str = KEY, chunk_size: int | None = None):
    server = ServerConfig(key=key, uri=root.as_uri())
    source = folder.open(server, reactor, None)
    if chunk_size is not None:
        source.chunk_size = chunk_size
    return source


async def retrieve(source, target: Target, consumer: Collector | None = None):
    consumer = consumer or Collector()
    retrieval = source.retrieve(target, consumer)
    assert verifyObject(IRetrieval, retrieval)
    count = await retrieval.done
    assert count == len(consumer.instances)
    assert consumer.current is None
    return consumer


def files(study, sops) -> list[bytes]:
    return [study.paths[sop].read_bytes() for sop in sops]


async def turns(n: int = 5) -> None:
    """Let the reactor and worker threads run a while."""
    for _ in range(n):
        await deferLater(reactor, 0.02, lambda: None)


def test_plugin_is_registered_for_file_uris():
    factory = registry.sources_by_scheme()["file"]
    assert factory is folder
    assert verifyObject(IDicomSourceFactory, factory)
    assert factory.name == "folder"


def test_config_accepts_absolute_file_uri(tmp_path):
    (tmp_path / "servers.json").write_text(
        json.dumps({KEY: {"uri": "file:///srv/dicom", "isDefault": True}})
    )
    (tmp_path / "models.json").write_text("{}")
    loaded = config.load(tmp_path)
    assert loaded.servers[KEY].uri == "file:///srv/dicom"


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("file:///srv/dicom", None),
        ("file://localhost/srv/dicom", None),
        ("file:/srv/dicom", None),
        ("file:///srv/my%20cases", None),
        ("file://srv/dicom", "three slashes"),
        ("file:demo/dicom", "absolute path"),
        ("file:///srv/dicom?x=1", "query"),
    ],
)
def test_check_uri(uri, problem):
    found = check_uri(uri)
    if problem is None:
        assert found is None
    else:
        assert problem in found


@pytest_twisted.ensureDeferred
async def test_series_study_and_instance_are_byte_identical(study, tree, warnings):
    source = open_source(tree)
    assert verifyObject(IDicomSource, source)
    sops = study.series[study.small_series_uid]
    # The first retrieve waits for the index being built.
    got = await retrieve(source, Target(study.study_uid, study.small_series_uid))
    assert got.instances == files(study, sops)
    # Only the small series is in the folder: the study is that series.
    got = await retrieve(source, Target(study.study_uid))
    assert got.instances == files(study, sops)
    got = await retrieve(source, Target(study.study_uid, study.small_series_uid, sops[1]))
    assert got.instances == files(study, sops[1:2])
    await source.close()


@pytest_twisted.ensureDeferred
async def test_small_chunks_reassemble(study, tree):
    source = open_source(tree, chunk_size=1000)
    sops = study.series[study.small_series_uid]
    got = await retrieve(source, Target(study.study_uid, study.small_series_uid))
    assert got.instances == files(study, sops)
    assert got.chunks > len(sops) * 5


@pytest_twisted.ensureDeferred
async def test_unknown_targets_are_not_found(study, tree):
    source = open_source(tree)
    small = study.small_series_uid
    sop = study.series[small][0]
    for target in (
        Target(MISSING),
        Target(study.study_uid, MISSING),
        Target(study.study_uid, small, MISSING),
        Target(MISSING, small),  # a known series under another study
        Target(study.study_uid, study.big_series_uid),  # only junk of it is there
    ):
        consumer = Collector()
        with pytest.raises(NotFound) as caught:
            await source.retrieve(target, consumer).done
        assert str(caught.value) == f"{target.describe()} not found at PACS server {KEY}"
        assert consumer.instances == [] and consumer.current is None
    assert sop  # the known instance is still there
    await retrieve(source, Target(study.study_uid, small, sop))


@pytest_twisted.ensureDeferred
async def test_junk_is_skipped_with_one_warning_each(study, tree, warnings):
    source = open_source(tree)
    await source.ready()
    texts = warnings.texts()
    assert len(texts) == len(JUNK), texts
    for name in JUNK:
        [line] = [t for t in texts if str(tree / "junk" / name) in t]
        assert KEY in line
    assert any("not a DICOM Part 10 file" in t and "README.txt" in t for t in texts)
    assert any("raw.dcm" in t and "not a DICOM Part 10 file" in t for t in texts)
    assert any("cut-in-pixels.dcm" in t and "truncated" in t for t in texts)
    assert not any(".hidden" in t or ".DS_Store" in t for t in texts)
    # A refresh does not repeat warnings about unchanged files.
    assert await source.refresh() == 3
    assert len(warnings.texts()) == len(JUNK)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_read_header_rejects_every_truncation(study, tmp_path):
    data = study.paths[study.series[study.small_series_uid][0]].read_bytes()
    path = tmp_path / "cut.dcm"
    accepted = []
    for size in list(range(0, 1200, 7)) + [len(data) - 1]:
        path.write_bytes(data[:size])
        if not isinstance(read_header(str(path)), str):
            accepted.append(size)
    assert accepted == []
    path.write_bytes(data)
    assert read_header(str(path)).sop == study.series[study.small_series_uid][0]


@pytest_twisted.ensureDeferred
async def test_pause_holds_delivery_until_resume(study, tree):
    source = open_source(tree, chunk_size=1000)
    sops = study.series[study.small_series_uid]
    consumer = Collector()
    holder = {}

    def pause_once(c: Collector) -> None:
        if c.chunks == 1:
            holder["retrieval"].pauseProducing()

    consumer.on_data = pause_once
    retrieval = holder["retrieval"] = source.retrieve(
        Target(study.study_uid, study.small_series_uid), consumer
    )
    while consumer.chunks == 0:
        await turns(1)
    await turns(10)
    assert consumer.chunks == 1
    assert not retrieval.done.called
    retrieval.resumeProducing()
    assert await retrieval.done == len(sops)
    assert consumer.instances == files(study, sops)


@pytest_twisted.ensureDeferred
async def test_paused_before_start_delivers_nothing(study, tree):
    source = open_source(tree)
    await source.ready()
    consumer = Collector()
    retrieval = source.retrieve(Target(study.study_uid), consumer)
    retrieval.pauseProducing()
    await turns(5)
    assert consumer.current is None and consumer.instances == []
    retrieval.resumeProducing()
    assert await retrieval.done == 3


@pytest_twisted.ensureDeferred
async def test_stop_producing_cancels(study, tree):
    source = open_source(tree, chunk_size=1000)
    consumer = Collector()
    holder = {}
    consumer.on_data = lambda c: holder["retrieval"].stopProducing()
    retrieval = holder["retrieval"] = source.retrieve(Target(study.study_uid), consumer)
    with pytest.raises(CancelledError):
        await retrieval.done
    await turns(5)
    assert consumer.chunks == 1 and consumer.instances == []


@pytest_twisted.ensureDeferred
async def test_stop_while_paused_or_waiting_for_index(study, tree):
    source = open_source(tree)
    # Before the index is built.
    retrieval = source.retrieve(Target(study.study_uid), Collector())
    retrieval.stopProducing()
    with pytest.raises(CancelledError):
        await retrieval.done
    await source.ready()
    # While paused.
    consumer = Collector()
    retrieval = source.retrieve(Target(study.study_uid), consumer)
    retrieval.pauseProducing()
    await turns(3)
    retrieval.stopProducing()
    with pytest.raises(CancelledError):
        await retrieval.done
    # done.cancel() stops it too.
    retrieval = source.retrieve(Target(study.study_uid), Collector())
    retrieval.done.cancel()
    with pytest.raises(CancelledError):
        await retrieval.done
    await turns(3)
    # The source still works afterwards.
    got = await retrieve(source, Target(study.study_uid))
    assert len(got.instances) == 3


@pytest_twisted.ensureDeferred
async def test_vanished_file_is_an_upstream_error(study, tree):
    source = open_source(tree)
    await source.ready()
    sops = study.series[study.small_series_uid]
    (tree / "a" / "y").unlink()  # holds the second instance
    consumer = Collector()
    with pytest.raises(UpstreamError) as caught:
        await source.retrieve(Target(study.study_uid, study.small_series_uid), consumer).done
    assert sops[1] in caught.value.detail
    assert str(tree) not in caught.value.detail
    assert consumer.instances == files(study, sops[:1])
    assert consumer.current is None


@pytest_twisted.ensureDeferred
async def test_file_replaced_by_junk_is_an_upstream_error(study, tree):
    source = open_source(tree)
    await source.ready()
    sops = study.series[study.small_series_uid]
    (tree / "x.dcm").write_text("overwritten")  # the third instance
    with pytest.raises(UpstreamError) as caught:
        await source.retrieve(Target(study.study_uid, study.small_series_uid, sops[2]), Collector()).done
    assert sops[2] in caught.value.detail


@pytest_twisted.ensureDeferred
async def test_refresh_picks_up_new_files(study, tree):
    small = study.series_files(study.small_series_uid)
    root = tree.parent / "growing"
    root.mkdir()
    shutil.copyfile(small[0], root / "one.dcm")
    source = open_source(root)
    got = await retrieve(source, Target(study.study_uid))
    assert len(got.instances) == 1
    big_sop = study.series[study.big_series_uid][0]
    shutil.copyfile(small[1], root / "two.dcm")
    (root / "more").mkdir()
    shutil.copyfile(study.paths[big_sop], root / "more" / "big.dcm")
    # The index is only rebuilt on refresh.
    got = await retrieve(source, Target(study.study_uid))
    assert len(got.instances) == 1
    assert await source.refresh() == 3
    got = await retrieve(source, Target(study.study_uid))
    # Series by SeriesNumber: the big series (1) before the small one (2).
    assert got.instances == files(study, [big_sop] + study.series[study.small_series_uid][:2])
    got = await retrieve(source, Target(study.study_uid, study.big_series_uid, big_sop))
    assert got.instances == files(study, [big_sop])


@pytest_twisted.ensureDeferred
async def test_concurrent_refreshes_all_complete(study, tree):
    source = open_source(tree)
    counts = [await d for d in [source.refresh(), source.refresh(), source.refresh()]]
    assert counts == [3, 3, 3]


@pytest_twisted.ensureDeferred
async def test_missing_folder_is_an_upstream_error_until_it_appears(study, tmp_path):
    root = tmp_path / "not-yet"
    source = open_source(root)
    for _ in range(2):
        with pytest.raises(UpstreamError) as caught:
            await source.retrieve(Target(study.study_uid), Collector()).done
        assert KEY in caught.value.detail
        assert str(root) not in caught.value.detail
    root.mkdir()
    shutil.copyfile(study.series_files(study.small_series_uid)[0], root / "one.dcm")
    got = await retrieve(source, Target(study.study_uid))
    assert len(got.instances) == 1


@pytest_twisted.ensureDeferred
async def test_relative_uri_is_refused_on_retrieve(study):
    source = folder.open(ServerConfig(key=KEY, uri="file:demo/dicom"), reactor, None)
    with pytest.raises(UpstreamError) as caught:
        await source.retrieve(Target(study.study_uid), Collector()).done
    assert "absolute path" in caught.value.detail
