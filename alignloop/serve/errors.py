"""OpenAI's error shape, shared by the API (`app.py`), the pages (`web.py`) and the scheduler's front
(`scheduler.py`): `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its own
exception for each status (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429
RateLimitError, 5xx InternalServerError)."""
from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    headers |= e.headers or {}
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in
          ((400, "bad request"), (401, "missing or wrong API key"), (404, "unknown model"))}
PAGE_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in
               ((400, "bad request"), (401, "not logged in (the chat page and arena need an account unless "
                                           "the server runs with --open)"),
                (403, "missing or wrong CSRF token"), (404, "unknown model, conversation or message"),
                (429, "rate limit: wait the Retry-After seconds"))}
# What a route that generates may answer besides: the server is busy (scheduler.py, Generator.start).
BUSY = {s: {"model": ErrorResponse, "description": d} for s, d in
        ((429, "the queue is full (--max-queue), or a rate limit: try again after Retry-After seconds"),
         (503, "the request waited longer than --request-timeout in the queue without starting"))}
