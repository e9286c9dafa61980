"""
The running proxy: owns the current config, the relay's upstream
connections, the worker threads and the listening certificates; reloads
them whole on SIGHUP and stops gracefully on SIGTERM.
"""
from __future__ import annotations

import signal
from pathlib import Path

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.threadpool import ThreadPool

from zhiva import config as configuration
from zhiva.config import Config
from zhiva.metrics import Metrics
from zhiva.relay import Relay
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
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.grace = grace
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

    def _on_sighup(self, signum, frame) -> None:
        # Only hand over to the reactor here: a signal handler may run at
        # any point of the reactor thread's work.
        self.reactor.callFromThread(lambda: ensureDeferred(self.reload()))
        if callable(self._previous_sighup):
            self._previous_sighup(signum, frame)

    async def reload(self) -> bool:
        """
        Re-read both config files and the certificates; swap them in one step
        if all are valid, else log why and keep what runs.
        """
        self.log.info("reload: reading {directory}", directory=str(self.config.directory))
        try:
            new, certificates = await deferToThreadPool(
                self.reactor, self._work_pool, self._read_all, self.config.directory
            )
        except configuration.ConfigError as e:
            for problem in e.problems:
                self.log.error("reload failed, running config kept: config error: {problem}", problem=str(problem))
            self.metrics.reloads.labels("failed").inc()
            return False
        except ValueError as e:
            self.log.error("reload failed, running config kept: {error}", error=str(e))
            self.metrics.reloads.labels("failed").inc()
            return False
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
        return True

    def _read_all(self, directory: Path):
        """Worker thread: the whole new state, or the first reason it is unusable."""
        new = configuration.load(directory)
        return new, [holder.load() for holder in self.tls]

    def stopService(self) -> Deferred:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
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
