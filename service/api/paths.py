"""The service's fixed paths, and the name a request's route goes by in logs and metrics."""

from __future__ import annotations

from typing import Final

from starlette.types import Scope

METRICS: Final[str] = "/metrics"
DOCS: Final[frozenset[str]] = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc",
                                         "/openapi.json"})
# Static files, served by mounts (which leave no route in the scope).
MOUNTS: Final[tuple[str, ...]] = ("/docs/assets", "/static")
UNMATCHED: Final[str] = "unmatched"
# The inference protocols' routes (KServe V1, Open Inference Protocol V2): their clients read
# an error's message from an ``error`` member, on every answer under these prefixes.
KSERVE_V1: Final[str] = "/v1/models"
OIP_V2: Final[str] = "/v2"


def is_protocol(path: str) -> bool:
    """Whether ``path`` is under an inference protocol's prefix, matched or not."""
    return any(path == p or path.startswith(p + "/") for p in (KSERVE_V1, OIP_V2))


def route_label(scope: Scope) -> str:
    """The route's template (``/models/{name}``), never the path itself, which may carry
    client values and must not grow label sets. An answer given before routing (the 401
    of a protected /metrics or /docs) names its fixed path, a mount's file the mount;
    anything else is ``unmatched``."""
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    path = scope.get("path", "")
    if path == METRICS or path in DOCS:
        return str(path)
    return next((m for m in MOUNTS if path.startswith(m + "/")), UNMATCHED)
