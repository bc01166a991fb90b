"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive and answering."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 when every configured collection is served: model loaded, gate passed, index caught up, warm."""
    state = runtime.readiness()
    return JSONResponse(state, status_code=200 if state["ready"] else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, runtime: RuntimeDep) -> Response:
    m = request.app.state.metrics
    for s in runtime.served.values():
        m.items.labels(s.name).set(s.collection.count())
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
