"""HEAD answered as GET without the body (RFC 9110 §9.3.2: every general-purpose server
supports GET and HEAD).

FastAPI routes declared for GET answer HEAD with 405: uptime monitors, load balancers and
``curl -I`` that check /healthz, /readyz or /models by HEAD were told the method is not
allowed. Innermost of the middlewares: the routes run the GET (same status and headers,
Content-Length included); the body is not sent. Everything outside sees the request as the
HEAD it was (the access log and metrics say HEAD). A path without GET still answers 405.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def no_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        scope["method"] = "GET"
        try:
            await self.app(scope, receive, no_body)
        finally:
            scope["method"] = "HEAD"
