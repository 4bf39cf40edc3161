"""The FastAPI application: app factory and lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service import __version__, dimse, logs, pipeline
from service.api import docs, problems
from service.api.admission import Admission, EdgeMiddleware
from service.api.cors import Cors
from service.api.deps import State
from service.api.head import HeadAsGet
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.request_id import RequestIdMiddleware
from service.api.routes import explain, health, kserve, models, oip
from service.config import Settings, get_settings, resolve_threads
from service.graph.cache import CompileCache
from service.models.repository import Repository, load_repository
from service.runtime.sessions import CPU, requested_providers
from service.runtime.worker import Limiter, Scheduler, serial_pool_kernels

log = logging.getLogger("medexplain")

DESCRIPTION = """\
Runs ONNX CNN classifiers on medical images (DICOM, PNG, JPEG) and explains every prediction
with heatmaps: CRM, Grad-CAM (exact gradients generated as ONNX graphs, no training
framework at run time).

The bundled `demo-cxr` model is trained on **synthetic phantoms**, not patient data: it
demonstrates the pipeline and is **not for diagnosis**.
"""


def open_repository(settings: Settings) -> Repository:
    """Load and compile the configured models (the service's lifespan, the CLI's explain)."""
    providers = requested_providers(settings.providers)
    repository = load_repository(settings.models, default=settings.default_model,
                                 providers=providers,
                                 threads=resolve_threads(settings.threads),
                                 head_batch=settings.head_batch,
                                 cache=(CompileCache(settings.compile_cache)
                                        if settings.compile_cache else None),
                                 image_batch=settings.max_batch_size,
                                 conv_algo_search=settings.cudnn_conv_algo_search,
                                 lazy_sessions=settings.lazy_sessions)
    used = {p for m in repository.models.values() for p in m.engine.providers}
    if providers[0] != CPU and providers[0] not in used:
        log.warning("%s was requested but is not usable here; running on %s",
                    providers[0], CPU)
    elif providers == [CPU]:
        log.info("no usable CUDA GPU (or providers=cpu): running on %s", CPU)
    return repository


# The web page's CSP: its own script modules, style sheet and icon from this origin (none
# of them inline) and nothing else runs; it talks to this origin only.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
               "connect-src 'self'; form-action 'none'; base-uri 'none'; "
               "frame-ancestors 'none'")


def create_app(settings: Settings | None = None, *,
               admission: Admission | None = None) -> FastAPI:
    """Build the app; models load and compile once, in the lifespan.

    ``admission`` is the edge's budget; the server passes its own so that SIGTERM can start
    the drain (service.server).
    """
    settings = settings or get_settings()
    logs.install()
    metrics = Metrics()
    admission = admission or Admission(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        repository = open_repository(settings)
        log.info("serving %d model(s), default %s", len(repository.models), repository.default)
        serial_pool_kernels()
        # Every admitted request may be waiting for the compute stream at once.
        scheduler = Scheduler(
            lambda name, jobs: pipeline.compute(repository.get(name), jobs),
            [m.engine.device for m in repository.models.values()],
            max_batch_size=settings.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            capacity=settings.max_concurrency + settings.max_queue).start()
        try:
            state = State(settings=settings, repository=repository,
                          limiter=Limiter(settings.max_concurrency, settings.max_queue),
                          metrics=metrics, scheduler=scheduler,
                          admission=admission)
            async with dimse.listening(settings, app, state):  # the C-STORE SCP, if configured
                yield state
        finally:
            scheduler.close()

    # The docs pages are docs.install_docs's: FastAPI's own load their scripts from a CDN.
    app = FastAPI(title="medexplain", version=__version__, description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None,
                  generate_unique_id_function=docs.operation_id)
    app.openapi = lambda: docs.openapi_document(app, settings)  # type: ignore[method-assign]
    problems.install(app)
    app.include_router(explain.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(kserve.router)
    app.include_router(oip.router)
    docs.install_docs(app)

    static = Path(__file__).parent / "static"
    demo_page = (static / "index.html").read_text(encoding="utf-8")
    # The page's own modules and style sheet: same origin, no build step, no CDN.
    app.mount("/static", StaticFiles(directory=static), name="static")
    page_headers = {"Content-Security-Policy": PAGE_POLICY,
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        """The web demo: upload an image, pick methods, see scores, overlays and regions."""
        return HTMLResponse(demo_page, headers=page_headers)

    # The last added runs first: metrics see every answer, the edge's own included.
    app.add_middleware(HeadAsGet)
    app.add_middleware(EdgeMiddleware, admission=admission, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        # Off unless configured: without these headers browsers keep other origins' pages
        # out. Outside the metrics, so that preflights are answered before routing.
        app.add_middleware(Cors, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Accept", "Authorization", "Content-Type",
                                          "X-API-Key", "X-Request-ID",
                                          "Inference-Header-Content-Length"],
                           expose_headers=["Retry-After", "X-Request-ID",
                                           "Inference-Header-Content-Length"])
    app.add_middleware(RequestIdMiddleware)  # outermost: ids, access log, unexpected errors
    return app
