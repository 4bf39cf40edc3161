"""The same HTTP API behind Ray Serve replicas (the optional extra ``ray``).

Each replica builds the app with :func:`service.main.create_app`, runs its lifespan (load
the models, compile the graphs) and answers through it, so every route, parameter, error
and header is the plain server's. ``X-Request-ID`` is said once, by Ray Serve's proxy: the
id it gave the request, which the app logs with. Ray answers overload itself (503 with
Retry-After, in plain text) before a replica sees the request; :class:`ProblemOverload`,
which Ray puts in front of its HTTP servers (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``),
turns that into the service's problem+json. The service keeps no state between requests,
so any replica can answer any request; each replica keeps its own metrics, so
``GET /metrics`` is the answering replica's.

Three ways in, one deployment:

- ``medexplain serve --ray [--replicas N]`` (:func:`serve_forever`) joins the cluster at
  ``ray_address`` / ``RAY_ADDRESS``, or starts a local one for the process;
- a Serve config file (KubeRay's ``RayService``, ``serve deploy``) names the application
  builder :func:`build`, with the settings in ``MEDEXPLAIN_*`` variables of the pods;
- :func:`application` for Python callers (the tests).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import Overloaded

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger("medexplain")

APP_NAME = "medexplain"
DEPLOYMENT_NAME = "medexplain"
# The plain server's Retry-After on overload (service.runtime.worker.Limiter).
OVERLOAD_RETRY_AFTER_S = 1
# The header the app (service.api.request_id) and Ray Serve's proxy answer the id in.
REQUEST_ID_HEADER = b"x-request-id"
PROBLEM_MEDIA_TYPE = b"application/problem+json"

# Request bodies (radiographs, tens of MB) cross from the proxy to a replica through Ray's
# object store. Spilling it to disk under memory pressure would write uploads to disk;
# without spilling a full store makes Ray wait or fail the call instead. Applied to the
# local cluster started here; a cluster we join is configured by whoever starts it
# (deploy/ray/rayservice.yaml sets it for KubeRay).
LOCAL_SYSTEM_CONFIG = {"automatic_object_spilling_enabled": False}

# Ray Serve reads its switches from the environment of each of its processes (proxy,
# controller, replicas). A local cluster inherits them from this process; a cluster that
# is joined must be started with them (deploy/ray/rayservice.yaml sets them for KubeRay).
SERVE_ENV: dict[str, str] = {
    # Ray's HTTP servers (its proxies, or the replicas under direct ingress) put these
    # middlewares in front: Ray's own overload answer becomes the service's problem+json.
    # Not set: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 (the app on the replica's own
    # event loop) took 2-3 ms off a no-op app here but nothing measurable off the app's
    # smallest request (BENCHMARKS.md), and would put the app beside Serve's control work.
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH":
        "service.scaleout.ray_serve:proxy_middlewares",
}
# ray_ingress = "haproxy": Ray 2.60's HAProxy ingress (Ray's KubeRay guide "Enable High
# Throughput on Ray Serve"), with direct ingress: HAProxy listens on host:port and
# balances over the replicas, each serving HTTP on a port of its own (30000-31000); Serve's
# proxy actors are not started. Ray's reading of HAProxy's per-request log (its
# serve_haproxy_* metrics) is switched off. HAProxy's stats page (port 8404) and Prometheus
# exporter (port 9101) cannot be: Ray's template binds both on every interface.
HAPROXY_ENV: dict[str, str] = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def local_cluster_env(settings: Settings, haproxy_dir: str | None = None) -> dict[str, str]:
    """The environment Ray Serve's processes of a local cluster are started with.

    Args:
        settings: the service's settings (``ray_ingress``).
        haproxy_dir: for ``haproxy``, a folder of ours for HAProxy's config, sockets and
            state (Ray's default, /tmp/haproxy-serve, is shared by every cluster on the
            machine); short, as HAProxy takes socket paths of at most 97 bytes.
    """
    env = dict(SERVE_ENV)
    if settings.ray_ingress == "haproxy":
        if haproxy_dir is None:
            raise ValueError("the haproxy ingress needs a folder for HAProxy's files")
        env |= HAPROXY_ENV | {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(haproxy_dir, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(haproxy_dir, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": haproxy_dir,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(haproxy_dir, "server-state"),
        }
    return env


class LifespanState:
    """Hands the app's lifespan state to each request, as uvicorn does.

    Ray Serve runs the wrapped app's lifespan in the replica (uvicorn's ``LifespanOn``) but
    does not put the state it yields into the scope of the requests, and the routes read
    the repository, limiter and metrics from ``request.state``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # The lifespan writes into this dict; keep it for the requests.
            self.state = scope.setdefault("state", {})
        else:
            # A shallow copy per request, like uvicorn: a request may add to its own state.
            scope["state"] = dict(self.state)
        await self.app(scope, receive, send)


class ProxyRequestId:
    """Leaves the ``X-Request-ID`` answer header to Ray Serve's proxy, which always adds it.

    The proxy gives every request an id (the client's, else a new one) in the request's
    headers before it reaches a replica, and appends it to the answer; the app takes the
    same id for its log lines and answers it too, so without this the header came twice.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_without_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    (k, v) for k, v in message.get("headers", ()) if k != REQUEST_ID_HEADER]}
            await send(message)

        await self.app(scope, receive, send_without_id)


class ProblemOverload:
    """Ray's own 503 answers as the service's problem+json (503, ``Retry-After``).

    When every replica is busy and the queue in front of them is full, Ray answers the
    request itself (``backpressure_config``), before any replica and so before the app's
    own admission: ``text/plain`` "Request dropped due to backpressure". Any 503 that is
    not already problem+json (Ray's "no replicas are available yet" too) is answered as the
    plain server answers overload: the same body, ``Retry-After`` and security headers.
    The request id Ray gave the request stays. Ray's own routes (``/-/healthz``,
    ``/-/routes``) are left as they are: load balancers read them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith("/-/"):
            await self.app(scope, receive, send)
            return
        replacing = False

        async def send_problem(message: Message) -> None:
            nonlocal replacing
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = dict(message.get("headers", ()))
                if not headers.get(b"content-type", b"").startswith(PROBLEM_MEDIA_TYPE):
                    replacing = True
                    body, problem_headers = overload_answer()
                    kept = [(k, v) for k, v in message.get("headers", ())
                            if k == REQUEST_ID_HEADER]
                    await send({"type": "http.response.start", "status": 503,
                                "headers": [*problem_headers, *kept]})
                    await send({"type": "http.response.body", "body": body})
                    return
            if replacing:
                return  # Ray's plain-text body: the problem's has been sent
            await send(message)

        await self.app(scope, receive, send_problem)


def overload_answer() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The plain server's overload answer: body and headers (those of its problem+json,
    then the security headers its edge puts on every answer)."""
    # Imported here: Ray's proxy imports this module and needs only this of the app.
    from service.api.admission import SECURITY_HEADERS
    from service.api.problems import response_for

    answer = response_for(Overloaded(
        "every replica is busy and the queue in front of them is full; retry shortly",
        retry_after_s=OVERLOAD_RETRY_AFTER_S))
    return bytes(answer.body), [*answer.raw_headers, *SECURITY_HEADERS]


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ProblemOverload)]


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve deployment options from the settings."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": settings.ray_num_cpus,
                              "num_gpus": settings.ray_num_gpus},
        # A replica is given what it works on at once: MAX_CONCURRENCY requests decoding
        # and rendering, or a full batch for its compute stream, whichever is more, and
        # never more than its app admits (MAX_CONCURRENCY + MAX_QUEUE); the rest wait in
        # the proxy's router for the first replica with room. Given its whole queue's
        # worth, the replica on the proxy's own node (which Ray prefers) would hold
        # requests back while the other replicas idle.
        "max_ongoing_requests": min(max(settings.max_concurrency, settings.max_batch_size),
                                    settings.max_concurrency + settings.max_queue),
        # Overload as the plain server answers it: beyond MAX_QUEUE waiting (per proxy),
        # 503 with Retry-After: 1, said by Ray (in plain text, which ProblemOverload turns
        # into problem+json). Ray has no queue of 0 (MAX_QUEUE=0: no waiting): one is the
        # least.
        "max_queued_requests": max(settings.max_queue, 1),
        "backpressure_config": {"status_code": 503, "retry_after_s": OVERLOAD_RETRY_AFTER_S},
        "logging_config": {"enable_access_log": settings.ray_access_log},
    }
    if settings.ray_autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "initial_replicas": max(settings.ray_min_replicas, 1),
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        }
    else:
        options["num_replicas"] = settings.ray_replicas
    return options


def application(settings: Settings) -> Application:
    """The Serve application: one deployment, each replica running ``create_app(settings)``."""
    if settings.dicom_port is not None:
        # Every replica would listen on it (and on one node, all but one would fail to);
        # Serve routes HTTP only.
        log.warning("the DICOM C-STORE SCP runs with the plain server only: "
                    "MEDEXPLAIN_DICOM_PORT is ignored under Ray Serve")
        settings = settings.model_copy(update={"dicom_port": None})

    def build_asgi_app() -> ASGIApp:
        # Runs in the replica: models load there, never in the process that deploys.
        from service.main import create_app
        from service.runtime.memory import keep_freed_memory

        keep_freed_memory()  # the replica is the serving process, as `serve` tunes its own
        return ProxyRequestId(LifespanState(create_app(settings)))

    ingress = serve.ingress(build_asgi_app)()
    return serve.deployment(ingress, **deployment_options(settings)).bind()


def build(args: dict[str, str]) -> Application:
    """Application builder for Serve config files: ``service.scaleout.ray_serve:build``.

    Settings come from the ``MEDEXPLAIN_*`` variables where the builder runs, then from the
    config's ``args`` (field names, e.g. ``{"threads": "2"}``), replica counts and
    resources included (``ray_replicas``, ``ray_autoscaling``, ``ray_num_cpus``, ...), so a
    config file and ``serve --ray`` size the deployment the same way.
    """
    return application(Settings.from_env(**args))


def start(settings: Settings) -> str | None:
    """Connect to (or start) the Ray cluster and start Serve's HTTP ingress on host:port.

    Returns:
        For a local cluster with the ``haproxy`` ingress, the folder of HAProxy's files,
        which the caller removes once the cluster has stopped; otherwise None.
    """
    haproxy_dir = None
    if settings.ray_address:
        ray.init(address=settings.ray_address)
        log.info("joined the Ray cluster at %s", settings.ray_address)
    else:
        if settings.ray_ingress == "haproxy":
            haproxy_dir = tempfile.mkdtemp(prefix="mxhap-")
        # The cluster's processes inherit this environment, and Serve reads its switches
        # from there (SERVE_ENV): set before the cluster starts.
        os.environ.update(local_cluster_env(settings, haproxy_dir))
        # "local": a cluster of our own even when another one runs on this machine.
        ray.init(address="local", include_dashboard=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)
        log.info("started a local Ray cluster (ingress: %s)", settings.ray_ingress)
    serve.start(proxy_location=settings.ray_proxy_location,
                http_options={"host": settings.host, "port": settings.port},
                # The proxies' access log; the replicas' is in deployment_options.
                logging_config={"enable_access_log": settings.ray_access_log})
    return haproxy_dir


def stop(settings: Settings, haproxy_dir: str | None) -> None:
    """Take down what :func:`start` and :func:`serve_forever` brought up.

    The application is deleted; a local cluster is stopped with Serve shut down first, so
    that each HTTP ingress is stopped by its own actor (an HAProxy manager stops its
    HAProxy process; killed with the cluster, it would leave HAProxy running). A joined
    cluster keeps running, and keeps any other Serve applications.
    """
    try:
        serve.delete(APP_NAME)
        if not settings.ray_address:
            serve.shutdown()
    finally:
        ray.shutdown()
        if haproxy_dir is not None:
            shutil.rmtree(haproxy_dir, ignore_errors=True)


def serve_forever(settings: Settings) -> int:
    """``medexplain serve --ray``: deploy, then wait for SIGINT/SIGTERM and take it down."""
    haproxy_dir = start(settings)
    stop_event = threading.Event()
    # After ray.init: its own handler for SIGTERM dumps a stack and aborts the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_event.set())
    try:
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        replicas = (f"{settings.ray_min_replicas}-{settings.ray_max_replicas} (autoscaling)"
                    if settings.ray_autoscaling else str(settings.ray_replicas))
        log.info("serving on http://%s:%d through Ray Serve, %s replica(s)",
                 settings.host, settings.port, replicas)
        stop_event.wait()
    finally:
        stop(settings, haproxy_dir)
    return 0


__all__ = ["APP_NAME", "LifespanState", "ProblemOverload", "ProxyRequestId", "application",
           "build", "deployment_options", "local_cluster_env", "proxy_middlewares",
           "serve_forever", "start", "stop"]
