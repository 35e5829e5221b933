"""``GET /metrics``: the service in Prometheus' text format, through ``prometheus_client``.

Every count is read from the store at each scrape (``tally``), so it covers every job,
each run in a process of its own, and survives a restart of the service.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .keys import STORE
from .store import Store
from .tally import BUCKETS, totals


class StoreCollector(Collector):
    """The metrics, read from the store at each scrape."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("downloader_jobs", "Jobs by state.", labels=["state"])
        for state, count in self._store.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        values = totals(self._store)
        images = CounterMetricFamily(
            "downloader_images", "Images fetched, by outcome.", labels=["status"]
        )
        for status in ("ok", "failed"):
            images.add_metric([status], values.get(f"images_{status}", 0.0))
        yield images
        yield CounterMetricFamily(
            "downloader_bytes", "Bytes of the images fetched.", value=values.get("bytes", 0.0)
        )
        yield _histogram(values)


def _histogram(values: dict[str, float]) -> HistogramMetricFamily:
    cumulative, buckets = 0.0, []
    for position, bound in enumerate((*BUCKETS, float("inf"))):
        cumulative += values.get(f"fetch_bucket_{position}", 0.0)
        buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
    return HistogramMetricFamily(
        "downloader_fetch_seconds",
        "An image's fetch time (its manifest line's elapsed_ms).",
        buckets=buckets,
        sum_value=values.get("fetch_sum", 0.0),
    )


routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(request.app[STORE]))
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
