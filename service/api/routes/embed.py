"""POST /embed: the embedding of one uploaded file, computed by the collection's model."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.deps import ReadKey, RuntimeDep, read_upload, served_collection
from service.api.openapi import COLLECTION, request_body
from service.api.schemas import EmbedPublic

router = APIRouter(tags=["embed"])

EMBED_BODY = request_body(multipart={"collection": COLLECTION})


@router.post("/embed", response_model=EmbedPublic, dependencies=[ReadKey], openapi_extra=EMBED_BODY)
async def embed(request: Request, runtime: RuntimeDep) -> EmbedPublic:
    upload = await read_upload(request)
    served = served_collection(runtime, upload.fields.get("collection"))
    prepared = await runtime.prepare(served, upload.data)
    vector = await runtime.embed(served, prepared.array)
    return EmbedPublic(
        sha256=prepared.sha256,
        format=prepared.format,
        model=served.bundle.id,
        dim=len(vector),
        embedding=vector.tolist(),
    )
