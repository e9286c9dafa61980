"""
Running an in-process model (``plugin:NAME``): fetch the selected instances,
parse them with pydicom and call the model, all in worker threads, under the
model's timeout. The instances are held in memory for the model, as any
model API would hold them.
"""
from __future__ import annotations

import time
from io import BytesIO
from typing import Any

import orjson
import pydicom
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from zhiva import registry
from zhiva.errors import NotFound, UpstreamError, UpstreamTimeout
from zhiva.interfaces import IDicomSource, IInstanceConsumer
from zhiva.limits import FetchCounter
from zhiva.selection import Fetch, Keyed, Node, Plan


@implementer(IInstanceConsumer)
class Collect:
    def __init__(self, counter=None) -> None:
        self.files: list[bytes] = []
        self._parts: list[bytes] = []
        self._counter = counter  # zhiva.limits.FetchCounter: the request's caps

    def instanceStarted(self) -> None:
        if self._counter is not None:
            self._counter.instance()
        self._parts = []

    def instanceData(self, data: bytes) -> None:
        if self._counter is not None:
            self._counter.data(len(data))
        self._parts.append(data)

    def instanceEnded(self) -> None:
        self.files.append(b"".join(self._parts))
        self._parts = []


async def fetch_all(plan: Plan, source: IDicomSource, timings, limits=None) -> dict[Fetch, list[bytes]]:
    """Every fetch of the plan, one after the other, as Part 10 bytes."""
    found: dict[Fetch, list[bytes]] = {}
    counter = FetchCounter(limits) if limits is not None else None
    for fetch in plan.fetches:
        collect = Collect(counter)
        retrieval = source.retrieve(fetch.target, collect)
        await retrieval.done
        if getattr(retrieval, "cached", False):
            timings.dicom_hits += 1
        timings.instances += len(collect.files)
        timings.bytes_from_pacs += sum(map(len, collect.files))
        what = fetch.target.describe()
        if not collect.files:
            raise NotFound(f"{what} has no instances at the PACS")
        if fetch.single and len(collect.files) != 1:
            raise UpstreamError(f"the PACS sent {len(collect.files)} instances for {what}")
        found[fetch] = collect.files
    return found


def shape_inputs(plan: Plan, datasets: dict[Fetch, list[Any]]) -> Any:
    """The plan's structure with Datasets in place of instances (SPEC.md shapes)."""

    def walk(node: Node) -> Any:
        if isinstance(node, Fetch):
            found = datasets[node]
            return found[0] if node.single else found
        assert isinstance(node, Keyed)
        return {key: {"data": walk(child)} for key, child in node.entries}

    return walk(plan.root)


def _infer(job, files: dict[Fetch, list[bytes]]) -> bytes:
    """Worker thread: parse, infer, serialise. Returns result JSON bytes."""
    name = f"model {job.model.key} (plugin:{job.model.plugin})"
    try:
        datasets = {
            fetch: [pydicom.dcmread(BytesIO(data)) for data in found]
            for fetch, found in files.items()
        }
    except Exception as e:
        raise UpstreamError(f"the PACS sent a DICOM file pydicom cannot read: {e}") from None
    model = registry.models()[job.model.plugin]
    try:
        result = model.infer(shape_inputs(job.plan, datasets), job.route.target)
    except Exception as e:
        raise UpstreamError(f"{name} failed: {type(e).__name__}: {e}") from None
    try:
        job.task.check(result, job.route)
        # pydicom UIDs are str subclasses: allow them as keys.
        return orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, ValueError) as e:
        raise UpstreamError(f"{name} returned an invalid {job.model.task} result: {e}") from None


async def run(job, source: IDicomSource, reactor, pool, timings, limits=None) -> bytes:
    files = await fetch_all(job.plan, source, timings, limits)
    timings.pacs_done = timings.model_started = time.monotonic()
    work = deferToThreadPool(reactor, pool, _infer, job, files)
    # A thread cannot be stopped: on timeout the viewer gets its 504 now and
    # the pool's bound keeps runaway models from taking over the proxy.
    work.addTimeout(job.model.timeout, reactor, onTimeoutCancel=_timed_out(job))
    try:
        return await work
    finally:
        timings.model_answered = time.monotonic()


def _timed_out(job):
    def raise_timeout(result, timeout):
        raise UpstreamTimeout(f"model {job.model.key} did not answer within {timeout:g} s")

    return raise_timeout
