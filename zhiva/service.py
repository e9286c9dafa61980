"""
The running proxy: owns the current config, the relay's upstream
connections and the worker threads, and closes them on stop.
"""
from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from zhiva.config import Config
from zhiva.relay import Relay


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

    def __init__(self, config: Config, reactor, threads: int = 4, model_threads: int = 2) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        pool = ThreadPool(minthreads=0, maxthreads=threads, name="zhiva-work")
        ThreadPoolService(pool).setServiceParent(self)
        # In-process models get their own pool so a slow one cannot starve
        # the result checks of remote models.
        model_pool = ThreadPool(minthreads=0, maxthreads=model_threads, name="zhiva-models")
        ThreadPoolService(model_pool).setServiceParent(self)
        self.relay = Relay(reactor, pool, model_pool)

    def current_config(self) -> Config:
        return self.config

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

    async def _stop(self) -> None:
        await super().stopService()
        await self.relay.close()

    def stopService(self):
        return ensureDeferred(self._stop())
