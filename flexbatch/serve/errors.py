"""OpenAI-style error objects for every failure the server answers, so clients built for
OpenAI's API (and their retry logic) read them as they read OpenAI's own."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def not_found(kind: str, object_id: str) -> APIError:
    return APIError(404, f"No {kind} found with id {object_id!r}.", code=f"{kind}_not_found")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError):
        # 400, not FastAPI's 422: OpenAI answers a malformed body with 400.
        first = e.errors()[0] if e.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        message = f"{'.'.join(where) + ': ' if where else ''}{first.get('msg', 'invalid request body')}"
        return error_response(400, message, ".".join(where) or None, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        message = "Unknown endpoint." if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, message, code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        return error_response(500, f"internal error ({type(e).__name__}: {e})", code="server_error")
