"""
The optional per-model result cache (``resultCache`` in models.json, off by
default): a repeated identical request is answered from the model's last
checked result without calling the model.

Entries live in memory, per model config: least recently used first out past
``maxEntries`` or ``maxBytes``, gone after ``ttl`` seconds on the reactor
clock. Only successful, checked results are kept. The key holds the model's
whole config, so a reload that changes the model never serves an old
result, and ``use`` drops the memory of configs no longer loaded.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class _ModelResults:
    def __init__(self, settings) -> None:
        self.settings = settings  # zhiva.config.ResultCacheConfig
        self.entries: OrderedDict[Hashable, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0

    def drop(self, key: Hashable) -> None:
        result, _ = self.entries.pop(key)
        self.bytes -= len(result)


class ResultCache:
    def __init__(self, clock) -> None:
        self._clock = clock
        self._models: dict = {}  # ModelConfig -> _ModelResults
        self._live: set | None = None  # configs of the running config; None: not told yet
        #: By model key, kept across reloads (Prometheus counters only go up).
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}

    def use(self, config) -> None:
        """The running config (at start and after each reload): forget other model configs."""
        self._live = set(config.models.values())
        for model in list(self._models):
            if model not in self._live:
                del self._models[model]

    def get(self, model, key: Hashable) -> bytes | None:
        if model.result_cache is None:
            return None
        results = self._for(model)
        if results is None:
            return None
        found = results.entries.get(key)
        if found is not None and self._clock.seconds() - found[1] >= model.result_cache.ttl:
            results.drop(key)
            found = None
        if found is None:
            self.misses[model.key] = self.misses.get(model.key, 0) + 1
            return None
        results.entries.move_to_end(key)
        self.hits[model.key] = self.hits.get(model.key, 0) + 1
        return found[0]

    def put(self, model, key: Hashable, result: bytes) -> None:
        settings = model.result_cache
        if settings is None or len(result) > settings.max_bytes:
            return
        results = self._for(model)
        if results is None:
            return  # the model changed while this request ran
        if key in results.entries:
            results.drop(key)
        results.entries[key] = (result, self._clock.seconds())
        results.bytes += len(result)
        while len(results.entries) > settings.max_entries or results.bytes > settings.max_bytes:
            results.drop(next(iter(results.entries)))

    def _for(self, model) -> _ModelResults | None:
        results = self._models.get(model)
        if results is None:
            if self._live is not None and model not in self._live:
                return None
            results = self._models[model] = _ModelResults(model.result_cache)
        return results

    def stats(self) -> dict:
        models: dict[str, dict] = {}
        for key in sorted(set(self.hits) | set(self.misses)):
            models[key] = {"entries": 0, "bytes": 0, "hits": self.hits.get(key, 0), "misses": self.misses.get(key, 0)}
        for model, results in self._models.items():
            found = models.setdefault(model.key, {"entries": 0, "bytes": 0, "hits": 0, "misses": 0})
            found["entries"] += len(results.entries)
            found["bytes"] += results.bytes
        return {
            "entries": sum(m["entries"] for m in models.values()),
            "bytes": sum(m["bytes"] for m in models.values()),
            "hits": sum(self.hits.values()),
            "misses": sum(self.misses.values()),
            "models": models,
        }
