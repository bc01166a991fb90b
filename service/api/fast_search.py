"""POST /search with a JSON body, answered without FastAPI's routing and dependency machinery.

Search by vector (or by stored id) is the hot path: tools send queries back to back, and the answer should
cost little more than the FAISS call. Through the FastAPI route (route matching, dependency solving,
request objects, four more middleware layers) a JSON search of 10k items took 0.28 ms in process on this
2-core machine, FAISS 0.09 ms of it; through this middleware 0.18 ms (docs/benchmarks.md). It answers with
the functions the route itself uses (access check, body parsing, search, serialisation, error bodies), so
the two cannot drift apart. Everything else, multipart searches included, goes on to the app, and the
route still describes /search in the OpenAPI docs.

It sits inside the metrics and body-size middleware: these requests are counted under the /search route,
and an oversized body gets the same 413.
"""

from __future__ import annotations

import time

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from embedder.errors import LookalikeError
from service.api.deps import check_read_access, media_type
from service.api.errors import ApiError, error_response
from service.api.routes.search import answer, query_from_json
from service.runtime import Runtime


class JsonSearchFastPath:
    def __init__(self, app: ASGIApp, runtime: Runtime, route: BaseRoute) -> None:
        self.app, self.runtime, self.route = app, runtime, route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or get_route_path(scope) != "/search":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if media_type(headers) != "application/json":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # what the router would have set: the metrics label
        started = time.perf_counter()
        try:
            check_read_access(headers, self.runtime)
            body = await _body(receive)
            if body is None:
                return  # the client went away
            served, xq, query = await query_from_json(self.runtime, body)
            response = await answer(self.runtime, served, xq, query, started)
        except (ApiError, LookalikeError) as exc:
            response = error_response(exc)
        await response(scope, receive, send)


async def _body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
