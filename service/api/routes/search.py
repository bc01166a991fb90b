"""POST /search: neighbours of an uploaded file, a vector, or a stored item."""

from __future__ import annotations

import time

import anyio
import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from service.api.deps import (
    ReadKey,
    RuntimeDep,
    float_field,
    int_field,
    media_type,
    read_upload,
    served_collection,
)
from service.api.errors import bad_request, not_found, unsupported_type
from service.api.openapi import COLLECTION, request_body
from service.api.schemas import HitPublic, SearchPublic, SearchQuery
from service.runtime import Runtime, Served

router = APIRouter(tags=["search"])

SEARCH_BODY = request_body(
    multipart={
        "collection": COLLECTION,
        "k": {"type": "integer", "default": 10},
        "score_threshold": {"type": "number"},
        "label": {"type": "string"},
    },
    json_schema=SearchQuery.model_json_schema(),
)


def _query_vector(served: Served, vector: list[float]) -> np.ndarray:
    xq = np.asarray(vector, dtype=np.float32)
    if xq.shape != (served.embedder.dim,):
        raise bad_request(f"vector must have {served.embedder.dim} values, got {xq.size}")
    norm = float(np.linalg.norm(xq))
    if not np.isfinite(norm) or norm == 0:
        raise bad_request("vector must be finite and non-zero")
    return xq / norm  # scores are cosines: the store holds unit vectors


async def query_from_json(runtime: Runtime, body: bytes) -> tuple[Served, np.ndarray, SearchQuery]:
    """The collection, unit query vector and options of a JSON search body (``{vector}`` or ``{id}``)."""
    try:
        query = SearchQuery.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where + ': ' if where else ''}{first['msg']}") from exc
    served = served_collection(runtime, query.collection)
    if query.vector is not None:
        return served, _query_vector(served, query.vector), query
    item = await anyio.to_thread.run_sync(served.collection.get, query.id)
    if item is None:
        raise not_found(f"item {query.id} in collection {served.name!r}")
    return served, item.vector.astype(np.float32), query


async def _from_file(request: Request, runtime: Runtime) -> tuple[Served, np.ndarray, SearchQuery]:
    upload = await read_upload(request)
    f = upload.fields
    served = served_collection(runtime, f.get("collection"))
    prepared = await runtime.prepare(served, upload.data)
    vector = await runtime.embed(served, prepared.array)
    query = SearchQuery.model_construct(
        collection=served.name,
        vector=None,
        id=None,
        k=int_field(f, "k", runtime.settings.default_k),
        score_threshold=float_field(f, "score_threshold"),
        label=f.get("label") or None,
    )
    return served, vector, query


async def answer(
    runtime: Runtime, served: Served, xq: np.ndarray, query: SearchQuery, started: float
) -> Response:
    """Search ``served`` for ``xq`` and serialise the answer; ``started`` is when the request came in."""
    if not 1 <= query.k <= runtime.settings.max_k:
        raise bad_request(f"k must be between 1 and {runtime.settings.max_k}")

    def run() -> list:
        return served.collection.search(
            xq[None, :], query.k, label=query.label, score_threshold=query.score_threshold
        )[0]

    # Small indexes are searched on the event loop: through a worker thread a 100k search measured 4.0 ms
    # p50 against 3.0 ms inline (one client, docs/benchmarks.md). Large ones go to a thread (one OpenMP
    # thread each, see Runtime.search_in_thread) so one slow search does not hold every other request.
    hits = run() if served.inline_search else await runtime.search_in_thread(run)
    body = SearchPublic(
        model=served.bundle.id,
        took_ms=round((time.perf_counter() - started) * 1000, 3),
        results=[
            HitPublic(id=h.id, score=h.score, sha256=h.sha256, name=h.name, label=h.label) for h in hits
        ],
    )
    # Serialised here: returning the model would make FastAPI validate it a second time.
    return Response(body.model_dump_json(), media_type="application/json")


@router.post("/search", response_model=SearchPublic, dependencies=[ReadKey], openapi_extra=SEARCH_BODY)
async def search(request: Request, runtime: RuntimeDep) -> Response:
    """Neighbours of an uploaded file (multipart), a vector or a stored item (JSON).

    JSON bodies are answered by ``service.api.fast_search`` before they reach this route, with the same
    functions; this route describes /search in the OpenAPI docs and serves multipart uploads.
    """
    started = time.perf_counter()
    kind = media_type(request.headers)
    if kind == "application/json":
        served, xq, query = await query_from_json(runtime, await request.body())
    elif kind == "multipart/form-data":
        served, xq, query = await _from_file(request, runtime)
    else:
        raise unsupported_type("send application/json ({vector} or {id}) or multipart/form-data with a file")
    return await answer(runtime, served, xq, query, started)
