"""Collections and their items: list, add (API key), delete (API key)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import ReadKey, RuntimeDep, WriteKey, read_upload, served_collection
from service.api.errors import ApiError, not_found
from service.api.openapi import request_body
from service.api.schemas import CollectionPublic, CollectionsPublic, ItemCreated, ItemDeleted
from service.store import NewItem, UnsupportedOperation, WriterBusy

router = APIRouter(prefix="/collections", tags=["collections"])

ITEM_BODY = request_body(
    multipart={
        "name": {"type": "string", "description": "Defaults to the uploaded file name."},
        "label": {"type": "string"},
    }
)


@router.get("", response_model=CollectionsPublic, dependencies=[ReadKey])
async def list_collections(runtime: RuntimeDep) -> CollectionsPublic:
    out = []
    for s in runtime.served.values():
        info = s.collection.info()
        out.append(
            CollectionPublic(
                name=s.name, model=info.model_id, dim=info.dim, index=info.index_kind, count=info.count
            )
        )
    return CollectionsPublic(collections=out)


@router.post(
    "/{name}/items",
    response_model=ItemCreated,
    status_code=201,
    dependencies=[WriteKey],
    openapi_extra=ITEM_BODY,
    responses={200: {"model": ItemCreated, "description": "already present (same sha256)"}},
)
async def add_item(name: str, request: Request, runtime: RuntimeDep) -> JSONResponse:
    served = served_collection(runtime, name)
    upload = await read_upload(request)
    prepared = await runtime.prepare(served, upload.data)
    vector = await runtime.embed(served, prepared.array)
    item = NewItem(
        sha256=prepared.sha256,
        vector=vector,
        name=upload.fields.get("name") or upload.filename,
        label=upload.fields.get("label") or None,
        source="api",
    )
    try:
        added = await anyio.to_thread.run_sync(served.collection.add, item)
    except WriterBusy as exc:
        raise ApiError(503, "busy", f"{exc}; retry shortly", {"Retry-After": "2"}) from exc
    body = ItemCreated(id=added.id, sha256=prepared.sha256, created=added.created)
    return JSONResponse(body.model_dump(), status_code=201 if added.created else 200)


@router.delete("/{name}/items/{item_id}", response_model=ItemDeleted, dependencies=[WriteKey])
async def delete_item(name: str, item_id: int, runtime: RuntimeDep) -> ItemDeleted:
    served = served_collection(runtime, name)
    try:
        deleted = await anyio.to_thread.run_sync(served.collection.delete, item_id)
    except UnsupportedOperation as exc:
        raise ApiError(409, "unsupported", str(exc)) from exc
    except WriterBusy as exc:
        raise ApiError(503, "busy", f"{exc}; retry shortly", {"Retry-After": "2"}) from exc
    if not deleted:
        raise not_found(f"item {item_id} in collection {name!r}")
    return ItemDeleted(id=item_id, deleted=True)
