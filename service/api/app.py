"""Builds the FastAPI app around a :class:`~service.runtime.Runtime`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from embedder.bundle import lookalike_version
from service.api import errors
from service.api.fast_search import JsonSearchFastPath
from service.api.limits import BodySizeLimit
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.routes import collections, embed, health, search
from service.runtime import Runtime

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and small fields around a file of the maximum size


def create_app(runtime: Runtime, *, fast_json_search: bool = True) -> FastAPI:
    """The app; the runtime must be loaded (``runtime.load()``, which runs the BN gate) beforehand.

    ``fast_json_search=False`` leaves JSON searches to the FastAPI route (the tests compare the two).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(runtime.warm_up)
        runtime.start_catch_up()
        for s in runtime.served.values():
            metrics.model.labels(s.name, s.bundle.id).set(1)
        yield
        await anyio.to_thread.run_sync(runtime.close)

    app = FastAPI(
        title="lookalike",
        version=lookalike_version(),
        summary="Similarity search for executables and images.",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.runtime, app.state.metrics = runtime, metrics
    errors.install(app)
    for module in (embed, search, collections, health):
        app.include_router(module.router)
    if fast_json_search:  # added first: it runs inside the metrics and body-size middleware
        route = next(r for r in search.router.routes if getattr(r, "path", None) == "/search")
        app.add_middleware(JsonSearchFastPath, runtime=runtime, route=route)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=runtime.settings.max_upload_bytes + MULTIPART_OVERHEAD)
    return app
