"""The server: the OpenAI-compatible API, and the app that puts it together with the pages.

`create_app(models, settings, db)` builds one FastAPI app serving every model by name; `add_pages`
adds the chat page and the arena (the routers of `routes/`, their shared state and `Gate` in `web.py`)
to the same app, and they generate through the same `Generator` (scheduler.py, the one owner of
generation jobs). Imports go one way: app → routes → web → scheduler → errors, settings; nothing
imports app.

Errors follow OpenAI (errors.py): `{"error": {"message", "type", "param", "code"}}` with 400 for bad
parameters (FastAPI's 422 becomes 400, as OpenAI answers), 401 for a missing or wrong API key, 404 for
an unknown model or route, 429 when the queue is full, 503 when a request waited too long to start.
Bad input is never a 500.
"""
from __future__ import annotations

import hmac
import json
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.serve.errors import BUSY, ERRORS, APIError, error_body, error_response
from alignloop.serve.routes import arena, chat, login
from alignloop.serve.scheduler import Generator, Job, Run
from alignloop.serve.settings import Served, Settings
from alignloop.serve.web import HERE, Gate, Site

__all__ = ["Served", "Settings", "create_app", "serve_in_thread"]


# ---------------------------------------------------------------- request and response shapes


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(description="system, user or assistant")
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request (the fields alignloop honours; others are accepted and ignored)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="alignloop/vLLM extension; 0 = off")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = Field(None, description="up to 4 sequences; the answer ends before the first")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "alignloop"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- the app


def create_app(models: dict[str, Served], settings: Settings | None = None, db=None) -> FastAPI:
    """`db`: a SQLAlchemy engine for the chat page and the arena (None: the API alone)."""
    settings = settings or Settings()
    gen = Generator(models, settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        gen.scheduler.close()

    # No /docs or /redoc: they load their scripts from a CDN. The schema is at /openapi.json.
    app = FastAPI(title="alignloop", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible chat API, a chat page and an arena for the models of a run.")
    app.state.gen = gen
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="an --api-key of the server, when it has any")

    def check_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if not settings.api_keys:
            return
        given = creds.credentials.encode() if creds else b""
        if not any(hmac.compare_digest(given, k.encode()) for k in settings.api_keys):
            raise APIError(401, "Incorrect API key provided" if creds else "Missing API key: pass a Bearer token",
                           code="invalid_api_key")
    # Only a server with keys declares (and checks) the Bearer scheme: an open server's schema says it is open.
    auth = [Depends(check_key)] if settings.api_keys else []

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS, dependencies=auth,
             tags=["openai"])
    def list_models():
        return ModelList(data=[ModelCard(id=n, created=gen.created) for n in models])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERRORS,
             dependencies=auth, tags=["openai"])
    def get_model(model: str):
        gen.model(model)
        return ModelCard(id=model, created=gen.created)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={
        **ERRORS, **BUSY, 200: {"description": "a chat completion, or with `stream` server-sent events of chunks",
                        "content": {"text/event-stream": {}}}}, dependencies=auth, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        job = gen.job(body.model, messages, n=body.n or 1, max_tokens=body.max_completion_tokens or body.max_tokens,
                      temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=body.stop,
                      seed=body.seed)
        cid, created = job.id, int(time.time())  # the id the server log and an error name too
        run = await gen.start(job)  # 429 / 503 here, while a stream can still answer with a status
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chunks(run, job, cid, created, body.model, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        outs = await run.completions()
        completion_tokens = sum(len(o.ids) for o in outs)
        return ChatCompletion(id=cid, created=created, model=body.model, choices=[
            Choice(index=i, message=AssistantMessage(content=o.text), finish_reason=_finish(o))
            for i, o in enumerate(outs)], usage=Usage(prompt_tokens=len(job.prompt), completion_tokens=completion_tokens,
                                                      total_tokens=len(job.prompt) + completion_tokens))

    if db is not None:
        add_pages(app, gen, db)
    return app


def add_pages(app: FastAPI, gen: Generator, db) -> None:
    """The chat page, the arena and their API, behind the run's accounts (`web.Gate`)."""
    site = Site(gen, db)
    app.state.site, app.state.throttle = site, site.throttle
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.add_middleware(Gate, Session=site.Session, open_=gen.settings.open)
    for area in (login, chat, arena):
        area.routes.add_to(app)


def _finish(o) -> str:
    return "length" if o.finish_reason == "length" else "stop"


async def _chunks(run: Run, job: Job, cid: str, created: int, model: str, include_usage: bool):
    """OpenAI's chunk stream: a role delta per choice, content deltas, a finish chunk per choice, the
    usage chunk when asked for, then [DONE]."""
    def chunk(choices, usage=None):
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    for i in range(job.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    try:
        async for items in run:
            out = []
            for _, event, payload in items:
                if event == "delta":
                    i, text = payload
                    out.append(chunk([{"index": i, "delta": {"content": text}, "logprobs": None,
                                       "finish_reason": None}]))
                    continue
                for i, o in enumerate(payload):
                    out.append(chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": _finish(o)}]))
                if include_usage:
                    done = sum(len(o.ids) for o in payload)
                    out.append(chunk([], {"prompt_tokens": len(job.prompt), "completion_tokens": done,
                                          "total_tokens": len(job.prompt) + done}))
            yield "".join(out)  # what arrived together goes out in one write
    except APIError as e:  # headers are gone: report in-band, as OpenAI does
        yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
    yield "data: [DONE]\n\n"


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) before they are read into memory and tokenized."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # a chunked body that grew past the limit
                raise StarletteHTTPException(413, "Request body too large")
            return message
        await self.app(scope, counted, send)

    async def _refuse(self, scope, receive, send):
        resp = JSONResponse(error_body(f"Request body too large: at most {self.limit} bytes", "invalid_request_error"),
                            status_code=413)
        await resp(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "We could not parse the JSON body of your request. (HINT: "
                                                "this likely means you aren't using your HTTP library correctly.)"))
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            msg = f"Missing required parameter: '{param}'." if param else "Missing request body."
        elif param:
            msg = f"Invalid value for '{param}': {msg}"
        return error_response(APIError(400, msg, param=param, code="invalid_value" if param else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else "error"
        if e.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}"
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        resp = JSONResponse(error_body(msg, kind), status_code=e.status_code)
        for k, v in (e.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):  # a bug, not bad input: still OpenAI's shape
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Run `app` under a real uvicorn server in a background thread; yields its base URL (port 0: a free
    port). For tests, notebooks and benchmarks; `alignloop serve` runs uvicorn in the foreground."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="alignloop-serve-http", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
