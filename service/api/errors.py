"""API errors: typed exceptions turned into JSON ``{"code", "message"}`` bodies by one set of handlers."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedder.errors import LookalikeError

log = logging.getLogger("lookalike.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def unsupported_type(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def error_response(exc: ApiError | LookalikeError) -> JSONResponse:
    """The JSON answer to a typed error: used by the handlers below and by the JSON search fast path."""
    if isinstance(exc, ApiError):
        return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=exc.headers)
    return JSONResponse(error_body(exc.code, str(exc)), exc.http_status)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    @app.exception_handler(LookalikeError)
    async def _typed_error(_: Request, exc: ApiError | LookalikeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(error_body("bad_request", f"{where}: {first.get('msg', 'invalid request')}"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal error; see the server log"), 500)
