"""Continuous batching for the server: requests join the engine's running batch instead of waiting in line.

Requests queue up here; ONE worker thread drives the engines (one per served model; the model is not
re-entrant and a 2-core CPU has nothing to spare). At every step of an engine the worker hands it the
waiting requests of its model that fit its free slots (a request with `n` choices needs n), then runs
one `Engine.step()`: the newcomers' prompts are prefilled and every running row gains a token. A row
that ends frees its slot at once, and the next waiting request takes it at the next step — a request's
first token no longer waits for a whole batch to finish. Streamed text goes back to each request from
the worker thread through `Job.emit`, which the web layer points at `loop.call_soon_threadsafe`. A
request whose client went away is cancelled: its rows leave at the next step and free their slots.

When every engine is idle and a first request arrives, the worker waits a few milliseconds while
requests are still arriving, so that a burst of clients shares one prefill.

The queue is bounded: at most `max_queue` requests wait (a request with n choices counts once), and
`submit` refuses more at once (`QueueFull`, answered 429) instead of letting clients wait behind a
queue they cannot see the end of. A request that has waited `request_timeout` seconds without starting
is taken out of the queue (answered 503). A request "starts" when the worker hands it to its engine.

This module owns generation jobs: `Generator`, the front the API (`app.py`) and the pages (`web.py`)
share, validates a request, builds its `Job`, queues it and hands back its events on the event loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Callable

from alignloop.errors import InputError
from alignloop.serve.errors import APIError
from alignloop.serve.settings import Served, Settings
from alignloop.tokenizer import validate_messages

# A failed generation is logged here with its traceback and its request's id (the id its client's 500 names).
log = logging.getLogger("alignloop.serve")


@dataclass
class Job:
    """One request: `n` samples of one prompt under one model with one set of parameters."""
    model: str
    prompt: list[int]
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] | None = None
    seed: int | None = None
    # emit(event, payload): ("start", None) when its batch starts, ("delta", (choice, text)) while generating,
    # then ("done", [Completion]) or ("error", Exception). Called from the worker thread.
    emit: Callable[[str, object], None] = lambda event, payload: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    order: int = field(default_factory=itertools.count().__next__)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")  # in the log and in its client's error

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    """More requests would wait than the queue holds (`max_queue`)."""


class Scheduler:
    """The one worker thread in front of the engines (one engine per served model)."""

    def __init__(self, engines: dict, max_batch: int = 32, gather_s: float = 0.005, max_queue: int = 256):
        self.engines, self.max_batch, self.gather_s, self.max_queue = engines, max_batch, gather_s, max_queue
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "cancelled_rows": 0, "refused": 0, "timed_out": 0}
        self._thread = threading.Thread(target=self._work, name="alignloop-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, *jobs: Job) -> None:
        """Queue `jobs`, all or none (the arena's two answers go together); `QueueFull` when they do not fit."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                self.stats["refused"] += len(jobs)
                raise QueueFull(f"{len(self._waiting)} requests are waiting and the queue holds {self.max_queue}")
            self._waiting.extend(jobs)
            self._cond.notify()

    def withdraw(self, *jobs: Job) -> bool:
        """Take `jobs` out of the queue, all or none: True if none had started; False (and nothing taken
        out) once the worker has taken one of them."""
        with self._cond:
            mine = {id(j) for j in jobs}  # identity: two jobs with the same fields are still two requests
            if sum(id(j) in mine for j in self._waiting) < len(mine):
                return False
            self._waiting = [j for j in self._waiting if id(j) not in mine]
            self.stats["timed_out"] += len(jobs)
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.emit("error", RuntimeError("the server is shutting down"))
            self._waiting.clear()
            self._cond.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        live: list[tuple[Job, list]] = []  # jobs handed to an engine, with their engine requests
        while True:
            with self._cond:
                while not self._waiting and not live and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for job, reqs in live:
                        for r in reqs:
                            r.cancel()
                    return
                burst = not live and bool(self._waiting)
            if burst:  # every engine idle: let a burst of clients arrive and share one prefill
                self._gather()
            with self._cond:
                live += self._admit()
            for job, reqs in live:  # a client gone: its rows leave at this step
                if job.cancelled.is_set():
                    for r in reqs:
                        r.cancel()
            for name, engine in self.engines.items():
                if engine.idle:
                    continue
                try:
                    engine.step()
                except Exception as e:  # its rows got their error (on_done, which logs each request); the
                    # worker lives on. An error that reached no request is logged here.
                    if not any(r.error is e for _, reqs in live for r in reqs):
                        log.error("model %r: a generation step failed and no request was running in it", name,
                                  exc_info=e)
                self.stats["max_rows"] = max(self.stats["max_rows"], engine.running)
            live = [(job, reqs) for job, reqs in live if not all(r.done for r in reqs)]

    def _gather(self) -> None:
        """Wait while requests keep arriving (a burst of clients, or the clients of the last answers coming
        back), `gather_s` at a time, up to 10 windows or a full batch. One lone request waits one window."""
        seen = -1
        for _ in range(10):
            with self._cond:
                rows = sum(j.n for j in self._waiting)
            if rows == seen or rows >= self.max_batch:
                return
            seen = rows
            time.sleep(self.gather_s)

    def _admit(self) -> list[tuple[Job, list]]:
        """Waiting requests, oldest first, into their engine's free slots (a request of n choices needs n
        free at once). A request that does not fit holds back the later ones of its model (no overtaking:
        a request with many choices is not starved by small ones); other models' requests go on."""
        self._waiting = [j for j in self._waiting if not _drop_if_cancelled(j)]
        free = {name: self.max_batch - e.running - e.waiting for name, e in self.engines.items()}
        started, keep = [], []
        for job in self._waiting:
            if job.n <= free[job.model]:
                free[job.model] -= job.n
                started.append((job, self._start(job)))
            else:
                free[job.model] = 0  # full for this step: later requests of this model wait their turn
                keep.append(job)
        self._waiting = keep
        if started:
            self.stats["batches"] += 1
            self.stats["rows"] += sum(job.n for job, _ in started)
        return started

    def _start(self, job: Job) -> list:
        """Hand one job's n choices to its engine; its events go back through job.emit."""
        from alignloop.engine import Params
        job.emit("start", None)  # before any token: a request's time-out counts only its wait in the queue
        reqs, failed = [], []

        def on_token(choice: int, text: str) -> bool:
            if job.cancelled.is_set():
                return False
            job.emit("delta", (choice, text))
            return True

        def on_done(_r) -> None:
            if any(r.error is not None for r in reqs):
                if not failed:
                    failed.append(True)
                    error = next(r.error for r in reqs if r.error is not None)
                    _log_failure(job, error)
                    job.emit("error", error)
                return
            if all(r.done for r in reqs):
                outs = [r.completion for r in reqs]
                self.stats["cancelled_rows"] += sum(o.finish_reason == "cancelled" for o in outs)
                job.emit("done", outs)

        engine = self.engines[job.model]
        try:
            for c in range(job.n):
                params = Params(max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_p=job.top_p,
                                top_k=job.top_k, stop=job.stop or None, seed=_row_seed(job.seed, c))
                reqs.append(engine.submit(job.prompt, params, on_token=lambda t, c=c: on_token(c, t),
                                          on_done=on_done))
        except Exception as e:  # noqa: BLE001 — the request gets the error; the worker must live on
            for r in reqs:
                r.cancel()
            _log_failure(job, e)
            job.emit("error", e)
            return []
        return reqs


def _log_failure(job: Job, error: BaseException) -> None:
    """One failed request in the server's log: its id (which its client's error names), its model, and
    the traceback of what failed."""
    log.error("generation failed for request %s (model %r, %d prompt tokens, n=%d): %s: %s", job.id, job.model,
              len(job.prompt), job.n, type(error).__name__, error, exc_info=error)


def _drop_if_cancelled(job: Job) -> bool:
    if job.cancelled.is_set():
        job.emit("error", RuntimeError("cancelled"))
        return True
    return False


def _row_seed(seed: int | None, choice: int) -> int | None:
    """Choice c of a seeded request draws from its own seed: the n choices differ from one another, and
    none depends on where the request sits in the batch (the engine uses a list of seeds as given)."""
    return None if seed is None else (seed * 1_000_003 + choice) % 2**63


# ---------------------------------------------------------------- the front on the event loop


class Generator:
    """Validates a request against a model and the limits, builds its `Job` and runs it through the
    scheduler: shared by the API and the pages (chat, arena)."""

    def __init__(self, models: dict[str, Served], settings: Settings):
        self.models, self.settings = models, settings
        self.scheduler = Scheduler({n: s.engine for n, s in models.items()}, settings.max_batch, settings.gather_s,
                                   settings.max_queue)
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

    async def start(self, *jobs: Job) -> Run:
        """Queue `jobs` (all or none: the arena's two answers) and return once the first of them runs, before
        any answer is sent: so a busy server can still answer with a status code, also to a stream (the
        arena's second answer may start later: its model's batch comes next). 429 when the queue
        is full (OpenAI answers 429 when overloaded too; the `openai` client raises RateLimitError and
        honours Retry-After); 503 when they waited `request_timeout` without starting (the client did
        nothing wrong, and the server may do better later: a temporary server-side failure, which the
        `openai` client retries; not 408, which would blame the client's slowness; not 504, which names a
        gateway)."""
        loop = asyncio.get_running_loop()
        outbox = self._outboxes.setdefault(loop, Outbox(loop))
        run = Run(jobs)
        queue = run.queue  # the emitters hold the queue, not the Run: a Run nobody holds is dropped (and cancelled)
        for k, job in enumerate(jobs):
            def emit(event, payload, k=k, job=job):
                try:
                    outbox.put(queue, (k, event, payload))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                    job.cancel()
            job.emit = emit
        try:
            self.scheduler.submit(*jobs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e} (its --max-queue); try again in a moment", type="requests",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except RuntimeError as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        await run.wait_start(self.scheduler, self.settings.request_timeout)
        return run


class Run:
    """Started jobs. Iterate it for lists of (job index, event, payload) — ("delta", (choice, text)) …, then
    ("done", completions) per job — as they arrive, until every job is done. The jobs are cancelled when
    the iteration stops early or the Run is dropped unread: a client that went away frees its rows at the
    next token."""

    def __init__(self, jobs: tuple[Job, ...]):
        self.jobs, self.queue = jobs, asyncio.Queue()

    async def wait_start(self, scheduler: Scheduler, timeout: float) -> None:
        """Until the first job starts (the worker emits "start" before any other event of a job); 503 when
        that takes longer than `timeout` seconds (0: no limit)."""
        deadline = time.monotonic() + timeout if timeout else None
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    k, event, payload = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    if scheduler.withdraw(*self.jobs):
                        raise APIError(503, f"The server is busy: this request waited {timeout:g} s in the queue "
                                            "without starting (the server's --request-timeout); try again later",
                                       type="server_error", code="queue_timeout", headers={"Retry-After": "5"})
                    deadline = None  # the worker took it just now: its "start" is on its way
                    continue
                if event == "error":
                    raise _failed(payload, self.jobs[k])
                return
        except BaseException:
            self.cancel()
            raise

    async def __aiter__(self):
        left = len(self.jobs)
        try:
            while left:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                items = [x for x in items if x[1] != "start"]  # a later job of the request starting
                for k, event, payload in items:
                    if event == "error":
                        raise _failed(payload, self.jobs[k])
                    left -= event == "done"
                if items:
                    yield items
        finally:
            self.cancel()

    async def completions(self) -> list:
        """The completions of a single job, once done."""
        async for items in self:
            for _, event, payload in items:
                if event == "done":
                    return payload

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    def __del__(self):
        self.cancel()  # a Run nobody reads (its response was never sent) must not keep generating


def _failed(e: Exception, job: Job) -> APIError:
    """A request's 500: it names the request's id, under which the server logged the traceback."""
    return APIError(500, f"generation failed (request {job.id}): {type(e).__name__}: {e}", type="server_error")


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
