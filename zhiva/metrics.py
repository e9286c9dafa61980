"""
Prometheus metrics of one running proxy (``GET /metrics``).

Each service has its own registry, so several proxies in one process (the
tests) never collide in prometheus-client's global one.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

# Inference takes seconds to minutes; PACS fetches milliseconds to minutes.
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf"))


class Metrics:
    log = Logger()

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "zhiva_requests", "Inference requests answered", ["kind", "model", "status"], registry=r
        )
        self.latency = Histogram(
            "zhiva_request_seconds", "Whole inference request time", ["kind"], buckets=_BUCKETS, registry=r
        )
        self.upstream = Histogram(
            "zhiva_upstream_seconds", "Time spent at each upstream", ["upstream"], buckets=_BUCKETS, registry=r
        )
        self.bytes = Counter(
            "zhiva_relayed_bytes", "Bytes relayed", ["direction"], registry=r
        )
        self.in_flight = Gauge("zhiva_requests_in_flight", "Inference requests in progress", registry=r)
        self.reloads = Counter("zhiva_config_reloads", "Config reloads", ["result"], registry=r)
        self.lag = Gauge(
            "zhiva_reactor_lag_seconds", "How late the reactor ran a 1 s timer, last sample", registry=r
        )
        self.lag_max = Gauge(
            "zhiva_reactor_lag_max_seconds", "Worst reactor lag seen since start", registry=r
        )
        self._lag_probe: LoopingCall | None = None
        self._worst_lag = 0.0

    def watch(self, relay) -> None:
        """Export the relay's cache and coalescing counters, read at each scrape."""
        self.registry.register(CacheCollector(relay))

    def observe(self, kind: str, model: str, status: int, timings, sent: int) -> None:
        self.requests.labels(kind, model, str(status)).inc()
        now = time.monotonic()
        self.latency.labels(kind).observe(now - timings.started)
        if timings.pacs_done is not None:
            self.upstream.labels("pacs").observe(timings.pacs_done - timings.started)
        if timings.model_started is not None:
            self.upstream.labels("model").observe((timings.model_answered or now) - timings.model_started)
        self.bytes.labels("from_pacs").inc(timings.bytes_from_pacs)
        self.bytes.labels("to_model").inc(timings.bytes_to_model)
        self.bytes.labels("to_viewer").inc(sent)

    def start_lag_probe(self, clock, interval: float = 1.0) -> None:
        expected = [clock.seconds() + interval]

        def probe() -> None:
            try:
                now = clock.seconds()
                lag = max(0.0, now - expected[0])
                expected[0] = now + interval
                self.lag.set(lag)
                if lag > self._worst_lag:
                    self._worst_lag = lag
                    self.lag_max.set(lag)
            except Exception:  # a LoopingCall stops forever on an error
                self.log.failure("reactor lag probe failed")

        self._lag_probe = LoopingCall(probe)
        self._lag_probe.clock = clock
        self._lag_probe.start(interval, now=False)

    def stop(self) -> None:
        if self._lag_probe is not None and self._lag_probe.running:
            self._lag_probe.stop()


class CacheCollector:
    """
    The DICOM cache, coalescing and result cache counters of
    ``Relay.cache_report()``: the caches keep plain numbers (no Prometheus in
    their code) and this turns them into metrics when scraped.
    """

    def __init__(self, relay) -> None:
        self._relay = relay

    def describe(self):
        return self._families({
            "dicom": {"enabled": True, "hits": 0, "misses": 0, "entries": 0, "bytes": 0,
                      "evictions": {}, "fills": {}},
            "coalescing": {"coalescedRequests": 0, "inFlight": 0},
            "results": {"models": {}},
        })

    def collect(self):
        return self._families(self._relay.cache_report())

    @staticmethod
    def _families(report: dict) -> list:
        found = []
        dicom = report["dicom"]
        if dicom["enabled"]:
            for name, what in (("hits", "served from the DICOM cache"),
                               ("misses", "fetched from the PACS through the DICOM cache")):
                counter = CounterMetricFamily(f"zhiva_dicom_cache_{name}", f"Retrieves {what}")
                counter.add_metric([], dicom[name])
                found.append(counter)
            evictions = CounterMetricFamily(
                "zhiva_dicom_cache_evictions", "DICOM cache entries removed", labels=["reason"]
            )
            for reason, count in sorted(dicom["evictions"].items()):
                evictions.add_metric([reason], count)
            fills = CounterMetricFamily("zhiva_dicom_cache_fills", "DICOM cache fills ended", labels=["result"])
            for result, count in sorted(dicom["fills"].items()):
                fills.add_metric([result], count)
            size = GaugeMetricFamily("zhiva_dicom_cache_bytes", "Bytes in the DICOM cache")
            size.add_metric([], dicom["bytes"])
            entries = GaugeMetricFamily("zhiva_dicom_cache_entries", "Entries in the DICOM cache")
            entries.add_metric([], dicom["entries"])
            found += [evictions, fills, size, entries]
        coalescing = report["coalescing"]
        coalesced = CounterMetricFamily(
            "zhiva_coalesced_requests", "Requests that joined an identical request already running"
        )
        coalesced.add_metric([], coalescing["coalescedRequests"])
        shared = GaugeMetricFamily("zhiva_shared_runs_in_flight", "Runs in flight that identical requests may join")
        shared.add_metric([], coalescing["inFlight"])
        found += [coalesced, shared]
        hits = CounterMetricFamily("zhiva_result_cache_hits", "Requests answered from the result cache", labels=["model"])
        misses = CounterMetricFamily(
            "zhiva_result_cache_misses", "Requests to a model with a result cache that had no answer", labels=["model"]
        )
        cached = GaugeMetricFamily("zhiva_result_cache_bytes", "Bytes of results kept", labels=["model"])
        for model, numbers in sorted(report["results"]["models"].items()):
            hits.add_metric([model], numbers["hits"])
            misses.add_metric([model], numbers["misses"])
            cached.add_metric([model], numbers["bytes"])
        found += [hits, misses, cached]
        return found
