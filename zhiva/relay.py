"""
One inference request's pipeline: check it, stream the selected instances
from the source through the model's protocol to the model, then check the
model's answer for its task.

Before running, a request is answered from the model's result cache
(``resultCache``) when it has the answer, or joins an identical request
already running (``zhiva.coalesce``); PACS retrieves go through the DICOM
cache (``zhiva.dicom_cache``) when ``--dicom-cache-dir`` is set.

``prepare`` does every check that needs no upstream; ``Relay.run`` does the
rest. Both take the ``Config`` the request started with, so a reload never
changes a request in flight.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import orjson
from twisted.internet.defer import CancelledError, ensureDeferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from zhiva import inprocess, registry
from zhiva.body import PlanBody
from zhiva.coalesce import Coalescer
from zhiva.dicom_cache import LOCAL_SCHEMES, CachedSource
from zhiva.result_cache import ResultCache
from zhiva.config import Config, ModelConfig, ServerConfig
from zhiva.errors import BadRequest, NotFound, UpstreamError, UpstreamTimeout
from zhiva.limits import Limits, ModelGate
from zhiva.selection import Plan, Route, check_uid, parse_filters, plan
from zhiva.upstream import (
    BodyTooLarge,
    ConnectionClosed,
    IdleTimeout,
    NoAnswer,
    Upstream,
    answer_within,
    describe,
    public_uri,
    read_body,
)


@dataclass(frozen=True)
class Job:
    """A request that passed every local check."""

    route: Route
    model: ModelConfig
    server: ServerConfig
    plan: Plan
    task: object
    protocol: object


@dataclass
class Timings:
    """Where a request's time and bytes went, for logs and metrics."""

    started: float = field(default_factory=time.monotonic)
    pacs_first_byte: float | None = None
    pacs_done: float | None = None
    model_started: float | None = None
    model_answered: float | None = None
    bytes_from_pacs: int = 0
    bytes_to_model: int = 0
    instances: int = 0
    #: Fetches of the plan, and how many the DICOM cache answered.
    fetches: int = 0
    dicom_hits: int = 0
    #: "result" (the result cache answered) or "shared" (joined an identical request).
    shortcut: str | None = None
    #: What the run is doing now, for the --max-request-seconds detail.
    stage: str = "starting"

    def take(self, run: Timings, with_bytes: bool) -> None:
        """Copy what a shared run measured; its bytes count once, for the request that started it."""
        for name in ("pacs_first_byte", "pacs_done", "model_started", "model_answered",
                     "instances", "fetches", "dicom_hits"):
            setattr(self, name, getattr(run, name))
        if with_bytes:
            self.bytes_from_pacs = run.bytes_from_pacs
            self.bytes_to_model = run.bytes_to_model

    def cache_note(self) -> str:
        """What answered without the upstreams, for the access log: "", "result", "shared+dicom", ..."""
        notes = [self.shortcut] if self.shortcut else []
        if self.dicom_hits:
            notes.append("dicom" if self.dicom_hits == self.fetches else f"dicom:{self.dicom_hits}/{self.fetches}")
        return "+".join(notes)


def prepare(config: Config, route: Route, server_key: str | None, filters: str | None) -> Job:
    model = config.models.get(route.model_key)
    if model is None:
        raise NotFound(f"no model {route.model_key} in models.json")
    task = registry.tasks()[model.task]
    if task.kind != route.kind:
        raise BadRequest(
            f"model {model.key} is a {model.task} model; ask for it under /{task.kind}/"
        )
    if route.level not in model.supports:
        raise BadRequest(
            f"model {model.key} does not support {route.level} requests "
            f"(it supports {', '.join(sorted(model.supports))})"
        )
    target = route.target
    check_uid("StudyInstanceUID", target.study)
    if target.series is not None:
        check_uid("SeriesInstanceUID", target.series)
    if target.instance is not None:
        check_uid("SOPInstanceUID", target.instance)
    if server_key is None:
        server = config.default_server()
        if server is None:
            raise BadRequest("no server query parameter and no server with isDefault: true")
    else:
        server = config.servers.get(server_key)
        if server is None:
            raise NotFound(f"no server {server_key[:80]!r} in servers.json")
    chosen = parse_filters(filters, route, model)
    return Job(
        route=route,
        model=model,
        server=server,
        plan=plan(route, chosen),
        task=task,
        protocol=registry.protocols()[model.protocol],
    )


class Relay:
    """
    Owns the upstream connections (one source per server config, one client
    per model TLS setting) and runs jobs through them.
    """

    log = Logger()

    def __init__(self, reactor, threadpool, model_pool, state_dir=None) -> None:
        self._reactor = reactor
        self._threadpool = threadpool
        self._model_pool = model_pool
        #: Where auth schemes keep tokens across restarts (--state-dir); None: nowhere.
        self.state_dir = state_dir
        self._sources: dict[ServerConfig, object] = {}
        self._auths: dict[ServerConfig, object] = {}
        self._users: dict[int, int] = {}  # id(source) -> requests using it
        self._retired: dict[int, object] = {}
        self._model_upstreams: dict[tuple, Upstream] = {}
        #: zhiva.dicom_cache.DicomCache with --dicom-cache-dir; None: every retrieve goes to the PACS.
        self.dicom_cache = None
        #: Identical concurrent requests share one run unless --no-coalescing.
        self.coalescing = True
        self.coalescer = Coalescer()
        self.results = ResultCache(reactor)
        self.set_limits(Limits())

    def set_limits(self, limits: Limits) -> None:
        """The caps of ``--max-*`` options; requests already waiting keep the old gate."""
        self.limits = limits
        self.gate = ModelGate(
            self._reactor, limits.model_concurrency, limits.model_queue,
            limits.queue_timeout, limits.retry_after,
        )

    def source(self, server: ServerConfig):
        source = self._sources.get(server)
        if source is None:
            scheme = server.uri.split(":", 1)[0].lower()
            factory = registry.sources_by_scheme()[scheme]
            source = factory.open(server, self._reactor, self.auth(server))
            if self.dicom_cache is not None and scheme not in LOCAL_SCHEMES:
                source = CachedSource(source, self.dicom_cache, server)
            self._sources[server] = source
        return source

    def auth(self, server: ServerConfig):
        """The ``IPacsAuth`` of ``server``, shared by its source and the status page."""
        auth = self._auths.get(server)
        if auth is None:
            auth = self._auths[server] = registry.auth_schemes()[server.auth_type].session(
                server,
                self.client(server.ca_file, server.tls_verify),
                self._reactor,
                state_dir=self.state_dir,
            )
        return auth

    def reloaded(self, config: Config) -> None:
        """
        After a reload: refresh sources whose server is unchanged (a folder
        re-indexes), retire the others once no request uses them.
        """
        self.results.use(config)
        current = set(config.servers.values())
        # Sources still running keep their own auth; new configs get new ones.
        self._auths = {server: auth for server, auth in self._auths.items() if server in current}
        for server, source in list(self._sources.items()):
            if server in current:
                refresh = getattr(source, "refresh", None)
                if refresh is not None:
                    maybeDeferred(refresh).addErrback(
                        lambda f, key=server.key: self.log.failure("re-reading server {key} failed", f, key=key)
                    )
                continue
            del self._sources[server]
            if self._users.get(id(source)):
                self._retired[id(source)] = source
            else:
                source.close()

    def _acquire(self, source) -> None:
        self._users[id(source)] = self._users.get(id(source), 0) + 1

    def _release(self, source) -> None:
        left = self._users[id(source)] = self._users[id(source)] - 1
        if not left:
            del self._users[id(source)]
            retired = self._retired.pop(id(source), None)
            if retired is not None:
                retired.close()

    def client(self, ca_file=None, verify: bool = True):
        """A shared treq client for small calls (status checks, sign-ins)."""
        return self._model_upstream(ca_file, verify).client

    def _model_upstream(self, ca_file, verify: bool) -> Upstream:
        key = (ca_file, verify)
        upstream = self._model_upstreams.get(key)
        if upstream is None:
            upstream = self._model_upstreams[key] = Upstream(self._reactor, ca_file, verify)
        return upstream

    async def run(self, job: Job, timings: Timings) -> bytes:
        """The model's result for ``job`` as plain JSON bytes, checked."""
        key = (job.model, job.server, job.route, job.plan)  # equal only under equal configs
        cached = self.results.get(job.model, key)
        if cached is not None:
            timings.shortcut = "result"
            return cached
        if not self.coalescing:
            return await self._run_and_keep(job, key, timings)

        def start():
            run_timings = Timings(started=timings.started)
            return ensureDeferred(self._run_and_keep(job, key, run_timings)), run_timings

        waiting, run, started = self.coalescer.join(key, start)
        if not started:
            timings.shortcut = "shared"
        try:
            return await waiting
        finally:
            timings.take(run.context, with_bytes=started)

    async def _run_and_keep(self, job: Job, key, timings: Timings) -> bytes:
        result = await self._run_gated(job, timings)
        self.results.put(job.model, key, result)
        return result

    async def _run_gated(self, job: Job, timings: Timings) -> bytes:
        gate, key = self.gate, job.model.key
        await gate.acquire(key)  # 503 when the model's queue is full or the wait too long
        try:
            source = self.source(job.server)
            self._acquire(source)
            try:
                return await self._deadline(job, ensureDeferred(self._run(job, source, timings)), timings)
            finally:
                self._release(source)
        finally:
            gate.release(key)

    async def _deadline(self, job: Job, running, timings: Timings) -> bytes:
        """
        ``running``, cancelled after ``--max-request-seconds``: the upstream
        timeouts bound each wait for a byte, not the whole, and a PACS or
        model that drips just faster than those would hold the model slot
        forever. Cancelling closes the upstream connections like a hang-up.
        """
        seconds = self.limits.max_request_seconds
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            running.cancel()

        timer = self._reactor.callLater(seconds, expire)
        try:
            return await running
        except CancelledError:
            if timed_out:
                raise UpstreamTimeout(
                    f"the request took more than {seconds:g} s (--max-request-seconds); "
                    f"it was {timings.stage}"
                ) from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _run(self, job: Job, source, timings: Timings) -> bytes:
        timings.fetches = len(job.plan.fetches)
        pacs, model = f"PACS server {job.server.key}", f"model {job.model.key}"
        if job.model.plugin is not None:
            timings.stage = f"fetching DICOM from {pacs} for in-process {model} or running it"
            return await inprocess.run(job, source, self._reactor, self._model_pool, timings, self.limits)
        encoder = job.protocol.encoder(job.plan)
        body = PlanBody(job.plan, encoder, source, self.limits)
        timings.stage = f"waiting for the first DICOM from {pacs}"
        body.on_done = lambda: setattr(timings, "stage", f"waiting for the answer of {model} (all DICOM fetched)")
        try:
            await body.prime()
            timings.stage = f"relaying DICOM from {pacs} to {model}"
            timings.pacs_first_byte = time.monotonic()
            answer = await self._call_model(job, body, encoder.contentType, timings)
        finally:
            body.cancel()
            timings.pacs_done = body.done_at
            timings.bytes_from_pacs = body.bytes_in
            timings.bytes_to_model = body.bytes_out
            timings.instances = body.instances
            timings.dicom_hits = body.cache_hits
        timings.model_answered = time.monotonic()
        return await deferToThreadPool(
            self._reactor, self._threadpool, decode_result, answer, job
        )

    async def _call_model(
        self, job: Job, body: PlanBody, content_type: bytes, timings: Timings
    ) -> bytes:
        model = job.model
        name = f"model {model.key}"
        upstream = self._model_upstream(model.ca_file, model.tls_verify)
        timings.model_started = time.monotonic()
        request = upstream.client.post(
            model.uri,
            data=body,
            headers={b"Content-Type": content_type},
            unbuffered=True,
            allow_redirects=False,
        )
        try:
            response = await answer_within(request, self._reactor, model.timeout)
        except NoAnswer:
            raise UpstreamTimeout(f"{name} did not answer within {model.timeout:g} s") from None
        except CancelledError:
            raise
        except Exception as e:
            if body.error is not None:
                raise body.error from None
            raise UpstreamError(
                f"{name} is unreachable at {public_uri(model.uri)}: {describe(Failure(e))}"
            ) from None
        if body.error is not None:
            raise body.error
        timings.stage = f"reading the answer of {name}"
        try:
            answer = await read_body(response, self._reactor, model.timeout, self.limits.max_result_bytes)
        except IdleTimeout:
            raise UpstreamTimeout(f"{name} stopped sending its answer for {model.timeout:g} s") from None
        except BodyTooLarge:
            raise UpstreamError(
                f"{name} answered more than {self.limits.max_result_bytes} bytes (--max-result-bytes)"
            ) from None
        except ConnectionClosed as e:
            raise UpstreamError(f"{name} broke off its answer: {e}") from None
        if response.code != 200:
            raise UpstreamError(f"{name} answered HTTP {response.code}{_excerpt(answer)}")
        return answer

    def cache_report(self) -> dict:
        """The DICOM cache, coalescing and result cache counters (status page, /metrics)."""
        return {
            "dicom": self.dicom_cache.stats() if self.dicom_cache is not None else {"enabled": False},
            "coalescing": {
                "enabled": self.coalescing,
                "inFlight": len(self.coalescer),
                "coalescedRequests": self.coalescer.coalesced,
            },
            "results": self.results.stats(),
        }

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()
        for upstream in self._model_upstreams.values():
            await upstream.close()


def decode_result(answer: bytes, job: Job) -> bytes:
    """
    Parse, unwrap a double-encoded answer, check it for the task. Runs in a
    worker thread. Returns the plain JSON to send to the viewer.
    """
    name = f"model {job.model.key}"
    try:
        result = orjson.loads(answer)
    except orjson.JSONDecodeError as e:
        raise UpstreamError(f"{name} answered something that is not JSON ({e}){_excerpt(answer)}") from None
    plain = answer
    if isinstance(result, str):
        # FastAPI's ORJSONResponse models send the result as a JSON string.
        plain = result.encode("utf-8")
        try:
            result = orjson.loads(plain)
        except orjson.JSONDecodeError as e:
            raise UpstreamError(f"{name} answered a JSON string that does not hold JSON ({e})") from None
    try:
        job.task.check(result, job.route)
    except ValueError as e:
        raise UpstreamError(f"{name} answered an invalid {job.model.task} result: {e}") from None
    return plain


def _excerpt(answer: bytes) -> str:
    text = answer[:200].decode("utf-8", "replace").strip()
    if not text:
        return ""
    text = " ".join(text.split())
    return f": {text[:160]!r}"
