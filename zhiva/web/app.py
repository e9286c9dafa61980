"""
The web front: the site, its request class, and the handler that turns a
route into a relay run and the run's outcome into an answer.
"""
from __future__ import annotations

import secrets
import time
from io import BytesIO

from twisted.internet.defer import CancelledError, ensureDeferred
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request, Site

from zhiva.config import Config
from zhiva.errors import BadRequest, ProblemError
from zhiva.limits import Limits
from zhiva.relay import Timings, prepare
from zhiva.selection import Route
from zhiva.viewer_auth import check_access
from zhiva.web import guard, problem
from zhiva.web.cors import CORSPolicy
from zhiva.web.resources import Root
from zhiva.web.health import Health, MetricsPage
from zhiva.web.status import StatusPage

log = Logger(namespace="zhiva.access")


class ZhivaRequest(Request):
    """Unexpected exceptions become a problem+json 500, never a traceback page."""

    request_id: str | None = None

    def processingFailed(self, reason: Failure):
        log.failure("Unhandled error answering {path}", reason, path=self.path)
        error = ProblemError(
            f"internal error in the proxy; the proxy log has the details (request {self.request_id})"
        )
        if self.startedWriting:
            self.transport.abortConnection()
            return None
        self.write(problem.prepare(self, error))
        self.finish()
        return reason


class ZhivaSite(Site):
    requestFactory = ZhivaRequest
    displayTracebacks = False

    def __init__(self, web: WebApp, **kwargs) -> None:
        super().__init__(web.root, **kwargs)
        self.web = web

    def log(self, request: ZhivaRequest) -> None:
        """Inference requests have their own access line; the rest get Twisted's."""
        if not getattr(request, "logged_by_us", False):
            super().log(request)

    def getResourceFor(self, request: ZhivaRequest):
        request.request_id = secrets.token_hex(8)
        request.setHeader(b"X-Request-Id", request.request_id.encode())
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        self.web.cors.apply(request)
        refused = guard.check(self.web, request)  # HSTS, URL length, viewer token
        if refused is not None:
            return guard.Refused(refused)
        return super().getResourceFor(request)

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        guard.configure_channel(protocol, self.web.limits)
        return protocol


class WebApp:
    """What the resources need: the service's current config, relay and metrics, CORS."""

    #: zhiva.viewer_auth.ViewerAuth with --viewer-auth-keys; None: no viewer token needed.
    viewer_auth = None
    limits = Limits()

    def __init__(self, service, cors: CORSPolicy, status_page: bool) -> None:
        self.service = service
        self.relay = service.relay
        self.metrics = service.metrics
        self.cors = cors
        self.root = Root(self)
        self.root.putChild(b"healthz", Health(self))
        self.root.putChild(b"metrics", MetricsPage(self, service.metrics.registry))
        if status_page:
            self.root.putChild(b"status", StatusPage(self))

    def config(self) -> Config:
        return self.service.current_config()

    def infer(self, request: ZhivaRequest, route: Route):
        config = self.config()  # this request keeps this config to the end
        timings = Timings()
        request.logged_by_us = True
        try:
            model = config.models.get(route.model_key)
            if model is not None:
                check_access(model, getattr(request, "viewer", None))
            job = prepare(config, route, _query(request, b"server"), _query(request, b"data-filters"))
        except ProblemError as error:
            self._access(request, route, None, error.status, timings)
            return problem.prepare(request, error)
        running = ensureDeferred(self.relay.run(job, timings))
        self.service.track(running)
        request.notifyFinish().addErrback(lambda _: running.cancel())
        running.addCallbacks(
            lambda result: self._answer(request, route, job, result, timings),
            lambda failure: self._fail(request, route, job, failure, timings),
        )
        return NOT_DONE_YET

    def _answer(self, request, route, job, result: bytes, timings: Timings) -> None:
        if request._disconnected:
            return
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Length", b"%d" % len(result))
        self._access(request, route, job, 200, timings, len(result))
        # A result can be ~100 MB: send it at the pace the viewer reads it.
        FileSender().beginFileTransfer(BytesIO(result), request).addCallbacks(
            lambda _: request.finish(), lambda _: None
        )

    def _fail(self, request, route, job, failure: Failure, timings: Timings) -> None:
        if failure.check(CancelledError) or request._disconnected:
            self._access(request, route, job, 499, timings)  # the viewer hung up
            return
        if failure.check(ProblemError):
            error = failure.value
        else:
            log.failure("Relay failed for request {request_id}", failure, request_id=request.request_id)
            error = ProblemError(
                f"internal error in the proxy; the proxy log has the details (request {request.request_id})"
            )
        self._access(request, route, job, error.status, timings, detail=error.detail)
        problem.send(request, error)

    def _access(self, request, route, job, status, timings: Timings, sent=0, detail=None) -> None:
        now = time.monotonic()
        model_ms = (
            ((timings.model_answered or now) - timings.model_started) * 1000
            if timings.model_started is not None
            else 0.0
        )
        pacs_ms = ((timings.pacs_done or now) - timings.started) * 1000 if job else 0.0
        model = route.model_key[:64]
        self.metrics.observe(route.kind, model if job else "-", status, timings, sent)
        log.info(
            "{request_id} {kind}{route_level} model={model} server={server} status={status} "
            "instances={instances} in={bytes_in} out={bytes_out} "
            "pacs={pacs_ms:.0f}ms model={model_ms:.0f}ms total={total_ms:.0f}ms{cache_text}{detail_text}",
            request_id=request.request_id,
            kind=route.kind,
            route_level=route.level.replace("/studies", "", 1) or "/studies",
            model=model,
            server=job.server.key if job else "-",
            status=status,
            instances=timings.instances,
            bytes_in=timings.bytes_from_pacs,
            bytes_out=sent,
            pacs_ms=pacs_ms,
            model_ms=model_ms,
            total_ms=(now - timings.started) * 1000,
            cache=timings.cache_note(),
            cache_text=f" cache={timings.cache_note()}" if timings.cache_note() else "",
            detail_text=f" detail={detail!r}" if detail else "",
        )


def _query(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name.decode()} is given {len(values)} times")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"query parameter {name.decode()} is not UTF-8") from None
