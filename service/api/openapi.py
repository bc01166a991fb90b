"""OpenAPI descriptions of the bodies the routes parse themselves (multipart uploads, JSON or multipart)."""

from __future__ import annotations

from typing import Any

FILE = {"type": "string", "format": "binary"}
COLLECTION = {"type": "string", "description": "Collection name; optional when only one is served."}


def request_body(*, multipart: dict[str, Any], json_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is a multipart upload with a ``file`` part (and the given
    other fields), or optionally JSON."""
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": {"file": FILE, **multipart}}
        }
    }
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    return {"requestBody": {"required": True, "content": content}}
