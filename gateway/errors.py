"""Errors in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), the mapping from
downstream gRPC status codes to HTTP, and the app's exception handlers that answer every error so.
"""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from videollm.proto_mapping import describe_errors
from videollm.transport import PARAM_METADATA

log = logging.getLogger(__name__)

COMPRESSION = ("videollm", "compression")  # where REST's compression settings sit in a chat body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "overloaded"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "backend_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", "cancelled"),
}


def from_grpc(err: grpc.aio.AioRpcError, service: str) -> APIError:
    status, type_, code = GRPC_TO_HTTP.get(err.code(), (502, "api_error", "backend_error"))
    message = err.details() or err.code().name
    if status >= 500:
        message = f"the {service} failed: {message}"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    param = dict(err.trailing_metadata() or ()).get(PARAM_METADATA)  # the REST field at fault, when it said
    return APIError(status, message, type_=type_, param=param, code=code, headers=headers)


# -- exception handlers ---------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


async def api_error(request: Request, err: APIError) -> JSONResponse:
    request.app.state.metrics.requests.labels(request.url.path, str(err.status)).inc()
    return err.response()


def _body_path(error: dict) -> tuple:
    return tuple(p for p in error.get("loc", ()) if p != "body")


async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    path = _body_path(first)
    where = ".".join(str(p) for p in path)
    if not where and first.get("type") == "missing":
        message = "the request body is missing: send a JSON object"
    elif path[:2] == COMPRESSION and len(path) > 2:  # a compression setting: state its range, as the encoder does
        under = [{**e, "loc": _body_path(e)[2:]} for e in errors if _body_path(e)[:2] == COMPRESSION]
        message = describe_errors([e for e in under if e["loc"]], ".".join(COMPRESSION))
    else:
        message = f"{where}: {first['msg']}" if where else first["msg"]
    return await api_error(request, bad_request(message, where or None))


async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return await api_error(request, APIError(err.status_code, str(err.detail), type_))


async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return await api_error(request, APIError(500, "internal error; see the gateway's log", "api_error"))
