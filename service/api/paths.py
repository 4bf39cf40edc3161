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
