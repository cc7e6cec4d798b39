"""Prometheus metrics for `GET /metrics`: requests by route and status, latency, queue time, batch sizes, queue depth.

Label values come only from a fixed set (route kinds, status codes, the served models' names), never
from a client's URL, so a scan of made-up model names cannot grow the series without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bmc.serve_edge.triton import ModelStatistics

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer": counted, never sent


# The *_created series double the output and say nothing a scrape needs.
disable_created_metrics()


class ServeMetrics:
    """One registry per server, so tests and several servers in one process never share counts."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_names: tuple[str, ...]):
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "bmc_serve_requests", "HTTP requests answered, by route and status code (499: client disconnected).",
            ["route", "status"], registry=self.registry,
        )
        self._latency = Histogram(
            "bmc_serve_request_latency_seconds", "Time from the request's arrival to its answer, infer and classify.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self._queue_time = Histogram(
            "bmc_serve_queue_time_seconds", "Time a request waited in the batch queue before its batch ran.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=self.registry,
        )
        self._batch_rows = Histogram(
            "bmc_serve_batch_size", "Rows per batch handed to onnxruntime.", ["model"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._queue_depth = Gauge("bmc_serve_queue_depth", "Requests waiting in the batch queue.", ["model"], registry=self.registry)
        self._in_progress = Gauge("bmc_serve_requests_in_progress", "Requests received and not yet answered.", registry=self.registry)
        self._refusals = Counter(
            "bmc_serve_http_refusals", "Requests and connections refused by the HTTP layer, by status code, or evicted "
            "(closed to make room at --max-connections) or connection_limit (refused: every connection busy).",
            ["reason"], registry=self.registry,
        )
        self._open_connections = Gauge("bmc_serve_open_connections", "Client connections open now.", registry=self.registry)
        # Children are looked up once: labels() takes a lock and hashes on every call.
        self._latency_by_model = {name: self._latency.labels(name) for name in model_names}
        self._queue_time_by_model = {name: self._queue_time.labels(name) for name in model_names}
        self._batch_by_model = {name: self._batch_rows.labels(name) for name in model_names}
        self._depth_by_model = {name: self._queue_depth.labels(name) for name in model_names}
        for child in self._depth_by_model.values():
            child.set(0)
        self._request_children: dict[tuple[str, int], object] = {}
        # Triton's statistics extension (GET .../stats): plain counters, updated on the event loop only.
        self.model_stats = {name: ModelStatistics() for name in model_names}

    def request_started(self) -> None:
        self._in_progress.inc()

    def request_finished(self, route: str, status: int, model: str | None, seconds: float) -> None:
        self._in_progress.dec()
        key = (route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(route, str(status))
        child.inc()
        if model is not None and model in self._latency_by_model:
            self._latency_by_model[model].observe(seconds)
            self.model_stats[model].request_finished(status == 200, seconds)

    def http_refused(self, reason: str) -> None:
        self._refusals.labels(reason).inc()

    def count_executions(self, models: dict) -> None:
        """Report each loaded model's runs by the runtime and target that ran them (bmc_serve_executions_total)."""
        self.registry.register(_ExecutionCollector(models))

    def count_connections(self, open_connections) -> None:
        """Read the number of open connections from `open_connections()` at each scrape."""
        self._open_connections.set_function(open_connections)

    def batch_ran(self, model: str, rows: int, queue_seconds: list[float]) -> None:
        self._batch_by_model[model].observe(rows)
        histogram = self._queue_time_by_model[model]
        for seconds in queue_seconds:
            histogram.observe(seconds)

    def batch_executed(self, model: str, requests: int, rows: int, batch_size: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """A batch ran and its requests got their outputs: the statistics extension's counts and durations."""
        self.model_stats[model].batch_executed(requests, rows, batch_size, queue_ns, input_ns, infer_ns, output_ns)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self._depth_by_model[model].set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ExecutionCollector:
    """Runs per model, runtime and target, read at each scrape from the counts the models keep
    (models.ServedModel.executions): which runtime really ran the batches, where the metadata picks one per batch size."""

    def __init__(self, models: dict):
        self.models = models

    def describe(self) -> list:
        return []  # nothing to check for clashes at registration: the name is this module's own

    def collect(self):
        family = CounterMetricFamily(
            "bmc_serve_executions", "Model runs (batches) completed, by the runtime and target (runtime, precision, threads) that ran them.",
            labels=["model", "runtime", "target"],
        )
        for name, model in self.models.items():
            counts: dict[tuple[str, str], int] = {}
            for session, runs in zip(model.sessions, list(model.executions)):
                key = (session.runtime, session.target.label)
                counts[key] = counts.get(key, 0) + runs
            for (runtime, label), runs in counts.items():
                family.add_metric([name, runtime, label], runs)
        yield family
