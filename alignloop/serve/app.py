"""The server: models, the batching scheduler, OpenAI-style errors, and the OpenAI-compatible API.

`create_app(models, settings, db)` builds one FastAPI app serving every model by name; the chat page
and the arena (`web.py`) are added to the same app and generate through the same scheduler.

Errors follow OpenAI: `{"error": {"message", "type", "param", "code"}}` with 400 for bad parameters
(FastAPI's 422 becomes 400, as OpenAI answers), 401 for a missing or wrong API key, 404 for an unknown
model or route. Bad input is never a 500.
"""
from __future__ import annotations

import asyncio
import hmac
import threading
import json
import time
import uuid
import weakref
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.errors import InputError
from alignloop.serve.scheduler import Job, Scheduler
from alignloop.tokenizer import validate_messages


@dataclass
class Settings:
    api_keys: list[str] = field(default_factory=list)  # empty: the API is open
    max_batch: int = 32                                 # rows per engine call (a request with n=k is k rows)
    max_tokens_limit: int = 1024                        # the largest `max_tokens` a request may ask for
    max_n: int = 8                                      # the largest `n`
    max_body_bytes: int = 8 * 2**20                     # a larger request body is answered 413
    gather_s: float = 0.005                             # wait this long after a first request for others
    temperature: float = 1.0                            # for a request that sets none (the chat page never does);
    top_p: float = 1.0                                  # 1.0 and 1.0 are the OpenAI API's own defaults
    # The chat page and the arena: behind the run's accounts (the labeling app's) unless `open`.
    open: bool = False                                  # anonymous use (a private demo), clearly labelled
    messages_per_minute: int = 20                       # per account: chat messages and regenerations
    battles_per_minute: int = 10                        # per account: arena battles
    votes_per_minute: int = 20                          # per account: arena votes
    per_address_factor: int = 4                         # per client address: this many times the above


@dataclass
class Served:
    name: str
    path: Path
    engine: object  # alignloop.engine.Engine
    tok: object     # alignloop.tokenizer.ChatTokenizer


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


# ---------------------------------------------------------------- generation shared by the API and the pages


class Generator:
    """Validates a request against a model and the limits, and runs it through the scheduler."""

    def __init__(self, models: dict[str, Served], settings: Settings):
        self.models, self.settings = models, settings
        self.scheduler = Scheduler({n: s.engine for n, s in models.items()}, settings.max_batch, settings.gather_s)
        self.created = int(time.time())
        self._outboxes = weakref.WeakKeyDictionary()  # event loop → its Outbox

    def model(self, name: str, param: str = "model") -> Served:
        if name not in self.models:
            raise APIError(404, f"The model '{name}' does not exist", param=param, code="model_not_found")
        return self.models[name]

    def job(self, model: str, messages: list[dict], *, n: int = 1, max_tokens: int | None = None,
            temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
            stop=None, seed: int | None = None) -> Job:
        served = self.model(model)
        try:
            validate_messages(messages)
        except InputError as e:
            raise APIError(400, e.message, param=e.field) from None
        s = self.settings
        if n > s.max_n:
            raise APIError(400, f"n is {n}; this server allows at most {s.max_n}", param="n")
        if max_tokens is not None and max_tokens > s.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {s.max_tokens_limit}",
                           param="max_tokens")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        prompt = served.tok.render_prompt(messages)
        ctx = served.engine.ctx
        if len(prompt) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the messages are "
                                f"{len(prompt)} tokens", param="messages", code="context_length_exceeded")
        room = ctx - len(prompt)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens; the messages are "
                                f"{len(prompt)} tokens and max_tokens asks for {max_tokens} more",
                           param="max_tokens", code="context_length_exceeded")
        return Job(model=model, prompt=prompt, n=n, max_new_tokens=max_tokens or min(room, s.max_tokens_limit),
                   temperature=s.temperature if temperature is None else temperature,
                   top_p=s.top_p if top_p is None else top_p,
                   top_k=top_k or 0, stop=[x for x in stops if x] or None,
                   seed=None if seed is None else seed % 2**40)  # the engine multiplies the seed: keep it small

    async def events(self, job: Job):
        """Run `job`; yield lists of events — ("delta", (choice, text)) … and at last ("done", completions) —
        as they arrive. Cancels the job when the consumer stops early (a client that went away frees its
        rows at the next token)."""
        async for items in self.events_many([job]):
            yield [(event, payload) for _, event, payload in items]

    async def events_many(self, jobs: list[Job]):
        """Run jobs side by side (the arena's two models); yield lists of (job index, event, payload)
        until every job is done."""
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.setdefault(loop, Outbox(loop))
        queue: asyncio.Queue = asyncio.Queue()
        for k, job in enumerate(jobs):
            def emit(event, payload, k=k, job=job):
                try:
                    outbox.put(queue, (k, event, payload))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    job.cancel()
            job.emit = emit
        for job in jobs:
            self.scheduler.submit(job)
        left = len(jobs)
        try:
            while left:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for _, event, payload in items:
                    if event == "error":
                        raise APIError(500, f"generation failed: {payload}", type="server_error")
                    left -= event == "done"
                yield items
        finally:
            for job in jobs:
                job.cancel()

    async def complete(self, job: Job):
        async for items in self.events(job):
            for event, payload in items:
                if event == "done":
                    return payload


class Outbox:
    """Events from the engine thread to the event loop. Buffered with at most one wake-up of the loop
    pending: with 32 streams, one wake-up carries a whole decoding step's tokens instead of 32, and
    the engine thread spends less time waiting for the GIL while the loop thread handles them."""

    def __init__(self, loop):
        self.loop, self.items, self.lock, self.pending = loop, [], threading.Lock(), False

    def put(self, queue: asyncio.Queue, item) -> None:
        with self.lock:
            self.items.append((queue, item))
            if self.pending:
                return
            self.pending = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nothing will drain; let the caller know
            with self.lock:
                self.pending = False
            raise

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.pending = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


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
        **ERRORS, 200: {"description": "a chat completion, or with `stream` server-sent events of chunks",
                        "content": {"text/event-stream": {}}}}, dependencies=auth, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                     else "".join(p.text for p in m.content)} for m in body.messages]
        job = gen.job(body.model, messages, n=body.n or 1, max_tokens=body.max_completion_tokens or body.max_tokens,
                      temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=body.stop,
                      seed=body.seed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chunks(gen, job, cid, created, body.model, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        outs = await gen.complete(job)
        completion_tokens = sum(len(o.ids) for o in outs)
        return ChatCompletion(id=cid, created=created, model=body.model, choices=[
            Choice(index=i, message=AssistantMessage(content=o.text), finish_reason=_finish(o))
            for i, o in enumerate(outs)], usage=Usage(prompt_tokens=len(job.prompt), completion_tokens=completion_tokens,
                                                      total_tokens=len(job.prompt) + completion_tokens))

    if db is not None:
        from alignloop.serve.web import add_pages
        add_pages(app, gen, db)
    return app


def _finish(o) -> str:
    return "length" if o.finish_reason == "length" else "stop"


async def _chunks(gen: Generator, job: Job, cid: str, created: int, model: str, include_usage: bool):
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
        async for items in gen.events(job):
            out = []
            for event, payload in items:
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
    import threading

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
