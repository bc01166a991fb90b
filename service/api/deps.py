"""Dependencies shared by the routes, as ``Annotated`` aliases: the runtime, API keys, uploads."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers, UploadFile

from service.api.errors import ApiError, bad_request, not_found, unsupported_type
from service.runtime import Runtime, Served


# Dependencies are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in
# its thread pool, and the two hops per request measured ~1 ms of a /search on the 2-core machine.
async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _presented_key(headers: Headers) -> str | None:
    key = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def _check_key(headers: Headers, runtime: Runtime) -> None:
    key = _presented_key(headers)
    if not key:
        raise ApiError(
            401, "unauthorized", "an API key is required (X-API-Key header)", {"WWW-Authenticate": "ApiKey"}
        )
    # Compare against every configured key, in constant time each, so timing reveals neither the key
    # nor which of the keys came closest.
    matches = [hmac.compare_digest(key.encode(), k.encode()) for k in runtime.settings.api_keys]
    if not any(matches):
        raise ApiError(403, "forbidden", "the API key is not valid")


def check_read_access(headers: Headers, runtime: Runtime) -> None:
    """Reads need a key only when ``require_key_for_reads`` is set; writes always do."""
    if runtime.settings.require_key_for_reads:
        _check_key(headers, runtime)


async def require_write_key(request: Request, runtime: RuntimeDep) -> None:
    _check_key(request.headers, runtime)


async def require_read_key(request: Request, runtime: RuntimeDep) -> None:
    check_read_access(request.headers, runtime)


WriteKey = Depends(require_write_key)
ReadKey = Depends(require_read_key)


def served_collection(runtime: Runtime, name: str | None) -> Served:
    if name is None:
        if len(runtime.served) == 1:
            return next(iter(runtime.served.values()))
        raise bad_request("field 'collection' is required when several collections are served")
    served = runtime.get(name)
    if served is None:
        raise not_found(f"collection {name!r}")
    return served


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass
class Upload:
    data: bytes
    filename: str | None
    fields: dict[str, str]


async def read_upload(request: Request, *, file_required: bool = True) -> Upload:
    """Parse a multipart upload: one ``file`` part plus small text fields; 415 for other bodies."""
    if media_type(request.headers) != "multipart/form-data":
        raise unsupported_type("send multipart/form-data with a 'file' part")
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except ApiError:
        raise
    except Exception as exc:  # malformed multipart bodies surface as assorted parser errors
        raise bad_request(f"malformed multipart body: {exc}") from exc
    fields: dict[str, str] = {}
    upload: UploadFile | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "file":
                raise bad_request(f"unexpected file part {key!r}; the file goes in 'file'")
            upload = value
        else:
            fields[key] = value
    if upload is None:
        if file_required:
            raise bad_request("missing the 'file' part")
        return Upload(b"", None, fields)
    data = await upload.read()
    await form.close()
    return Upload(data, upload.filename, fields)


def int_field(fields: dict[str, str], name: str, default: int) -> int:
    if name not in fields:
        return default
    try:
        return int(fields[name])
    except ValueError as exc:
        raise bad_request(f"field {name!r} must be an integer") from exc


def float_field(fields: dict[str, str], name: str) -> float | None:
    if name not in fields or fields[name] == "":
        return None
    try:
        return float(fields[name])
    except ValueError as exc:
        raise bad_request(f"field {name!r} must be a number") from exc
