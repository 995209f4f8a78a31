"""Serve's HTTP proxy callback: a small request body travels with the request to the replica.

Ray Serve's HTTP proxy sends the ingress replica only the request's ASGI scope; the replica
then fetches the body with a second actor call back to the proxy (Ray 2.60:
``ray.serve._private.http_util.ASGIReceiveProxy`` -> ``ProxyActor.receive_asgi_messages``),
a round trip on the critical path of every POST: ~3 ms of a 14 ms ``/search`` at load ~30 on
the 2-core machine, half the Router's own time (``benchmarks/search_latency.py`` prints it as
``/floor/body`` - ``/floor/empty``).

``middlewares()`` is that callback: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=
serve.proxy:middlewares`` in the environment the proxy starts in (``serve.app.LOW_LATENCY_ENV``,
which ``retriever serve`` sets for a local cluster; on another cluster set it on every node
before Ray starts). It gives the proxy :class:`BodyInScope`: an HTTP request that declares a
``Content-Length`` of at most :data:`MAX_CARRIED_BYTES` is read in the proxy (before it is
routed; its bytes are usually already there) and its body put in the scope under
:data:`BODY_KEY` (bytes), which ``serve.api.read_body`` takes instead of streaming it. The
messages read are replayed to the proxy's own receive loop, so an app that streams its body
still gets it and a disconnect is still seen. Chunked or larger bodies, and every app that does
not look for the key, go as before. Without the callback the app streams the body as before.
"""

from __future__ import annotations

BODY_KEY = "retriever.body"  # ASGI scope key: the request body (bytes), read by the proxy
MAX_CARRIED_BYTES = 1 << 20  # the search API's default body limit (serve.api.ApiSettings)


def declared_length(scope: dict) -> int | None:
    """The request's Content-Length as an int, or None when absent or not a byte count."""
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() and len(text) <= 18 else None
    return None


class BodyInScope:
    """Pure ASGI middleware for Serve's proxy (see the module docstring)."""

    def __init__(self, app, max_bytes: int = MAX_CARRIED_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        length = declared_length(scope) if scope["type"] == "http" else None
        if length is None or length > self.max_bytes:
            return await self.app(scope, receive, send)
        read, body = [], bytearray()
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":  # a disconnect: nothing to carry
                break
            body += message.get("body", b"")
            if len(body) > self.max_bytes:  # more than declared: let the app refuse it
                break
            if not message.get("more_body", False):
                scope[BODY_KEY] = bytes(body)
                break

        async def replay():
            return read.pop(0) if read else await receive()

        await self.app(scope, replay, send)


def middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``'s callback: the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(BodyInScope)]
