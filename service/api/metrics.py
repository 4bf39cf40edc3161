"""Prometheus metrics, collected by a pure ASGI middleware (no BaseHTTPMiddleware).

Names and labels follow Prometheus' conventions (https://prometheus.io/docs/practices/
naming/): base units, ``_total`` counters, ``code`` and ``method`` labels on HTTP metrics,
``process_*`` from the standard process collector and a ``medexplain_build_info`` gauge
of 1 whose labels say what is running.
"""

from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING, Final

import onnxruntime
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api.admission import ABANDONED
from service.api.paths import UNMATCHED, route_label

if TYPE_CHECKING:
    from service.pipeline import Result

# The status counted for a request whose client went away before its answer (nginx's).
CLIENT_CLOSED: Final[int] = 499

# Where a route leaves the name of the served model it used (see label_model).
_MODEL_KEY: Final[str] = "medexplain.model"


class Metrics:
    """One registry per app, so several apps (tests) never clash."""

    def __init__(self) -> None:
        # process_* and python_* come from prometheus_client's default registry, which
        # /metrics appends (with the compute streams' metrics): not registered here again.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "medexplain_http_requests", "HTTP requests by method, route, status code and model",
            ["method", "handler", "code", "model"], registry=self.registry,
        )
        self.latency = Histogram(
            "medexplain_http_request_duration_seconds",
            "HTTP request duration by method, route, status code and model",
            ["method", "handler", "code", "model"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.method_latency = Histogram(
            "medexplain_method_duration_seconds", "explanation method compute time",
            ["model", "method"], registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.pending = Gauge(
            "medexplain_pending_requests", "requests computing or waiting",
            registry=self.registry,
        )
        # The DICOM SCP (service.dimse): what became of each received image, and of each
        # delivery of its results. Label values are fixed words, statuses and the
        # configured destinations' names: never anything a sender wrote.
        self.dicom_stores = Counter(
            "medexplain_dicom_stores", "C-STOREs the SCP answered, by status and outcome",
            ["status", "outcome"], registry=self.registry,
        )
        self.dicom_deliveries = Counter(
            "medexplain_dicom_deliveries", "results sent on, by destination and outcome",
            ["destination", "outcome"], registry=self.registry,
        )
        self.dicom_delivery_latency = Histogram(
            "medexplain_dicom_delivery_duration_seconds",
            "time to send one image's results to a destination, by destination",
            ["destination"], registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.dicom_rejected = Counter(
            "medexplain_dicom_associations_rejected",
            "associations the SCP rejected, by reason", ["reason"], registry=self.registry,
        )
        build = Gauge(
            "medexplain_build_info", "what is running: always 1, the facts are the labels",
            ["version", "python_version", "onnxruntime_version"], registry=self.registry,
        )
        build.labels(__version__, platform.python_version(), onnxruntime.__version__).set(1)

    def observe_methods(self, result: Result) -> None:
        """Each method's compute time in one explained request."""
        for method in dict.fromkeys(m.method for m in result.maps):
            self.method_latency.labels(result.model.name, method).observe(
                result.watch.timings[method] / 1e3)


def label_model(request: Request, name: str) -> None:
    """Name the served model a request uses, for the ``model`` label of its HTTP metrics.

    Routes call it with a model the repository resolved, never with what the client
    wrote: label values stay the few served names.
    """
    request.scope[_MODEL_KEY] = name


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if scope.get(ABANDONED):
                status = CLIENT_CLOSED
            handler = route_label(scope)
            # Only the methods of known paths; anything else is one value, for the same
            # reason (label sets must not grow with what clients send).
            method = scope["method"] if handler != UNMATCHED else "other"
            labels = (method, handler, str(status), scope.get(_MODEL_KEY, ""))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
