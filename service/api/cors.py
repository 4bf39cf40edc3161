"""CORS for browser frontends on other origins: Starlette's middleware, with its preflight
answers made like every other answer of the service."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from service.api.admission import SECURITY_HEADERS
from service.api.problems import problem


class Cors(CORSMiddleware):
    """Preflights are answered here, before the edge middleware that adds the security
    headers to the rest, and Starlette refuses one as text/plain: here a refused preflight
    is problem+json (400 ``cors_refused``) and every preflight has the security headers."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 200:
            detail = bytes(answer.body).decode()  # "Disallowed CORS origin, method"
            kept = {k: v for k, v in answer.headers.items()
                    if k not in ("content-type", "content-length")}
            answer = problem(answer.status_code, "CORS preflight refused",
                             f"{detail} (see MEDEXPLAIN_CORS_ORIGINS)", "cors_refused", kept)
        for name, value in SECURITY_HEADERS:
            answer.headers[name.decode()] = value.decode()
        return answer
