"""
The running proxy: owns the current config, the relay's upstream
connections, the worker threads and the listening certificates; reloads
them whole on SIGHUP and stops gracefully on SIGTERM.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from zhiva import config as configuration
from zhiva.config import Config
from zhiva.metrics import Metrics
from zhiva.relay import Relay
from zhiva.sd_notify import Notifier, monotonic_usec
from zhiva.tls import ServerTLS

DEFAULT_GRACE = 30.0


class ThreadPoolService(Service):
    """A bounded pool for CPU work kept off the reactor (result checks)."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """
    A listener's endpoint that also fires ``listening`` with the port once it
    listens (None if it could not), for systemd's READY=1.
    """

    def __init__(self, endpoint, https: bool) -> None:
        self.endpoint = endpoint
        self.https = https
        self.listening: Deferred = Deferred()

    def listen(self, factory) -> Deferred:
        def report(result):
            if not self.listening.called:
                self.listening.callback(result if not isinstance(result, Failure) else None)
            return result

        return self.endpoint.listen(factory).addBoth(report)

    def where(self, port) -> str:
        address = port.getHost()
        if hasattr(address, "port"):
            host = f"[{address.host}]" if ":" in address.host else address.host
            return f"{'https' if self.https else 'http'}://{host}:{address.port}"
        name = getattr(address, "name", address)
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


class ZhivaService(MultiService):
    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor,
        *,
        threads: int = 4,
        model_threads: int = 2,
        grace: float = DEFAULT_GRACE,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.grace = grace
        # systemd Type=notify: READY/RELOADING/STOPPING; sends nothing without $NOTIFY_SOCKET.
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.listening_on = ""
        self._endpoints: list[_ReportingEndpoint] = []
        self.metrics = Metrics()
        self.tls: list[ServerTLS] = []
        self.listeners: list[Service] = []
        self.in_flight: set[Deferred] = set()
        self.log_observer: ILogObserver | None = None
        self._previous_sighup = None
        self._work_pool = ThreadPool(minthreads=0, maxthreads=threads, name="zhiva-work")
        ThreadPoolService(self._work_pool).setServiceParent(self)
        # In-process models get their own pool so a slow one cannot starve
        # the result checks of remote models.
        model_pool = ThreadPool(minthreads=0, maxthreads=model_threads, name="zhiva-models")
        ThreadPoolService(model_pool).setServiceParent(self)
        self.relay = Relay(reactor, self._work_pool, model_pool)
        self.relay.results.use(config)
        self.metrics.watch(self.relay)

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        # twistd's application: let it log where our options say.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)

    def current_config(self) -> Config:
        return self.config

    def listen(self, listener: Service, tls: ServerTLS | None = None) -> None:
        self.listeners.append(listener)
        if getattr(listener, "endpoint", None) is not None:
            # StreamServerEndpointService's documented ivar: learn when it listens.
            listener.endpoint = _ReportingEndpoint(listener.endpoint, https=tls is not None)
            self._endpoints.append(listener.endpoint)
        listener.setServiceParent(self)
        if tls is not None:
            self.tls.append(tls)

    def track(self, request: Deferred) -> None:
        """Remember an inference in flight until it ends (graceful stop waits for these)."""
        self.in_flight.add(request)
        self.metrics.in_flight.inc()

        def done(result):
            self.in_flight.discard(request)
            self.metrics.in_flight.dec()
            return result

        request.addBoth(done)

    # Start, reload, stop

    def privilegedStartService(self) -> None:
        """Listen (twistd calls this first); a port that cannot be had ends start-up in one line."""
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or 'all interfaces'} port {e.port}"
            sys.stderr.write(f"zhiva: cannot listen on {where}: {e.socketError} (--listen)\n")
            raise SystemExit(1) from None

    def startService(self) -> None:
        for warning in self.config.warnings:
            self.log.warn("{warning}", warning=warning)
        self.log.info(
            "zhiva: {servers} server(s), {models} model(s) from {directory}",
            servers=len(self.config.servers),
            models=len(self.config.models),
            directory=str(self.config.directory),
        )
        super().startService()
        self.metrics.start_lag_probe(self.reactor)
        if hasattr(signal, "SIGHUP") and self.reactor.__class__.__name__ != "MemoryReactorClock":
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        endpoints = list(self._endpoints)
        DeferredList([e.listening for e in endpoints]).addCallback(self._all_listening, endpoints)

    def _all_listening(self, results, endpoints: list[_ReportingEndpoint]) -> None:
        ports = [port for _, port in results]
        if not self.running:
            return  # stopped before it listened
        if any(port is None for port in ports):
            # No READY=1: systemd's start timeout then fails the unit (the error is logged).
            failed = sum(port is None for port in ports)
            self.notifier.notify(f"STATUS=could not listen on {failed} of {len(ports)} endpoint(s)")
            return
        self.listening_on = ", ".join(e.where(port) for e, port in zip(endpoints, ports))
        self.notifier.notify("READY=1", f"STATUS=listening on {self.listening_on}")

    def _on_sighup(self, signum, frame) -> None:
        # Only hand over to the reactor here: a signal handler may run at
        # any point of the reactor thread's work.
        self.reactor.callFromThread(lambda: ensureDeferred(self.reload()))
        if callable(self._previous_sighup):
            self._previous_sighup(signum, frame)

    async def reload(self) -> bool:
        """
        Re-read both config files and the certificates; swap them in one step
        if all are valid, else log why and keep what runs. systemd hears
        RELOADING=1 before and READY=1 after, either way.
        """
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading the config")
        problem = "reload failed unexpectedly, running config kept"
        try:
            problem = await self._reload()
        finally:
            where = f"; listening on {self.listening_on}" if self.listening_on else ""
            if problem is None:
                self.notifier.notify("READY=1", f"STATUS=config reloaded{where}")
            else:
                self.notifier.notify("READY=1", f"STATUS=reload refused, running config kept: {problem}{where}")
        return problem is None

    async def _reload(self) -> str | None:
        """The reload itself: None if it was swapped in, else the first reason it was not."""
        self.log.info("reload: reading {directory}", directory=str(self.config.directory))
        try:
            new, certificates = await deferToThreadPool(
                self.reactor, self._work_pool, self._read_all, self.config.directory
            )
        except configuration.ConfigError as e:
            for problem in e.problems:
                self.log.error("reload failed, running config kept: config error: {problem}", problem=str(problem))
            self.metrics.reloads.labels("failed").inc()
            more = f" (+{len(e.problems) - 1} more, see the log)" if len(e.problems) > 1 else ""
            return f"config error: {e.problems[0]}{more}" if e.problems else "config error"
        except ValueError as e:
            self.log.error("reload failed, running config kept: {error}", error=str(e))
            self.metrics.reloads.labels("failed").inc()
            return str(e)
        old, self.config = self.config, new
        for holder, options in zip(self.tls, certificates):
            holder.swap(options)
        for warning in new.warnings:
            self.log.warn("{warning}", warning=warning)
        changed = configuration.changes(old, new)
        for line in changed or ["no change in servers.json or models.json"]:
            self.log.info("reload: {change}", change=line)
        self.log.info("reload: done; TLS certificate re-read for {count} listener(s)", count=len(self.tls))
        self.relay.reloaded(new)
        self.metrics.reloads.labels("succeeded").inc()
        return None

    def _read_all(self, directory: Path):
        """Worker thread: the whole new state, or the first reason it is unusable."""
        new = configuration.load(directory)
        return new, [holder.load() for holder in self.tls]

    def stopService(self) -> Deferred:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.notifier.notify(
            "STOPPING=1", f"STATUS=stopping: {len(self.in_flight)} request(s) in flight, up to {self.grace:g} s"
        )
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
        # Stop accepting first; then let what is in flight finish.
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            await listener.disownServiceParent()
        if self.in_flight:
            self.log.info(
                "stopping: waiting up to {grace:g} s for {count} request(s) in flight",
                grace=self.grace,
                count=len(self.in_flight),
            )
            waiting = DeferredList(list(self.in_flight), consumeErrors=True)
            timer = self.reactor.callLater(self.grace, waiting.cancel)
            try:
                await waiting
            except Exception:
                pass
            if timer.active():
                timer.cancel()
            for request in list(self.in_flight):
                request.cancel()
        self.metrics.stop()
        await super().stopService()
        await self.relay.close()
        self.log.info("stopped")
