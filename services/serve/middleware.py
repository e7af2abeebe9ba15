"""The server's ASGI layers and its one error shape (OpenAI's).

``BodyLimit`` reads a POST body up to a limit and hands it on as JSON whatever
its content type; ``AccessLog`` writes one line per request; ``error_response`` is the
only way the server answers a failure.
"""
from __future__ import annotations

import json
import sys
import time

MAX_BODY = 1 << 20


class BodyLimit:
    """Pure ASGI: reads a POST body up to ``max_body`` bytes (413 beyond, whatever
    Content-Length claims) and replays it, then passes ``receive`` through untouched so
    handlers can watch for the client's disconnect."""

    def __init__(self, app, max_body: int = MAX_BODY):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        size = dict(scope["headers"]).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            shown = size.decode("latin-1")[:32]
            return await error_response(413, f"request body of {shown} bytes exceeds the limit of {self.max_body}",
                                                "too_large")(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await error_response(413, f"request body exceeds the limit of {self.max_body} bytes",
                                                    "too_large")(scope, receive, send)
        replay = [{"type": "http.request", "body": body, "more_body": False}]
        # every POST body is JSON: curl -d sends a form content type, which FastAPI would not parse
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                 + [(b"content-type", b"application/json")]}

        async def replayed():
            return replay.pop() if replay else await receive()
        return await self.app(scope, replayed, send)


# OpenAI's error types by status; ``code`` says more (edge-reft's own names)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 499: "invalid_request_error", 503: "overloaded_error"}


def error_body(message: str, kind: str, code: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None):
    """The one error shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``,
    rendered as ASCII JSON so no text a client sent (a lone surrogate, say) can make the
    error itself fail."""
    from fastapi.responses import Response
    err = error_body(message, _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                     code, param)
    body = json.dumps(err, ensure_ascii=True, allow_nan=False, default=str)
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class AccessLog:
    """Pure ASGI: one line per request on stderr (client, method, path, status, seconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sent(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, sent)
        finally:
            client = (scope.get("client") or ("-",))[0]
            path = scope.get("path", "")[:200].encode("ascii", "backslashreplace").decode()
            print(f"[edge-reft] {client} {scope.get('method')} {path} {status[0] or '-'} "
                  f"{time.perf_counter() - t0:.3f}s", file=sys.stderr, flush=True)
