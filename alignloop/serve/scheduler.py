"""Batching: concurrent requests share one `Engine.generate` call instead of waiting in line.

Requests queue up; ONE worker thread (engine calls are serialised — the model is not re-entrant and a
2-core CPU has nothing to spare) takes every waiting request of one model, up to `max_batch` rows (a
request with `n` choices is n rows), and runs them as one batch with per-row sampling parameters.
Streamed text goes back to each request from the worker thread through `Job.emit`, which the web
layer points at `loop.call_soon_threadsafe`. A request whose client went away is cancelled: its rows
stop at the next token (the engine's `on_token` returns False) and free their slots.

Static batching: a batch runs to its end before the next one starts; requests that arrive meanwhile
form the next batch. Before a batch starts, the worker waits a few milliseconds while requests are
still arriving, so that a burst of clients shares one batch instead of the first one running alone.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


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
    # emit(event, payload): ("delta", (choice, text)) while generating, then ("done", [Completion]) or
    # ("error", Exception). Called from the worker thread.
    emit: Callable[[str, object], None] = lambda event, payload: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    order: int = field(default_factory=itertools.count().__next__)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """The one worker thread in front of the engines (one engine per served model)."""

    def __init__(self, engines: dict, max_batch: int = 32, gather_s: float = 0.005):
        self.engines, self.max_batch, self.gather_s = engines, max_batch, gather_s
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "cancelled_rows": 0}
        self._thread = threading.Thread(target=self._work, name="alignloop-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._cond.notify()
        return job

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
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            self._gather()
            with self._cond:
                batch = self._take()
            if batch:
                self._run(batch)

    def _gather(self) -> None:
        """Wait while requests keep arriving (a burst of clients, or the clients of the last batch coming
        back), `gather_s` at a time, up to 10 windows or a full batch. One lone request waits one window."""
        seen = -1
        for _ in range(10):
            with self._cond:
                rows = sum(j.n for j in self._waiting)
            if rows == seen or rows >= self.max_batch:
                return
            seen = rows
            time.sleep(self.gather_s)

    def _take(self) -> list[Job]:
        """The oldest live request's model; then every waiting request of it that fits the batch."""
        self._waiting = [j for j in self._waiting if not _drop_if_cancelled(j)]
        if not self._waiting:
            return []
        model = self._waiting[0].model
        ctx = self.engines[model].ctx
        batch, rows, longest, budget = [], 0, 0, 0
        for job in self._waiting:
            if job.model != model:
                continue
            if batch and rows + job.n > self.max_batch:
                break
            # The engine gives every row the cache slots of the LONGEST prompt in the batch: a short prompt
            # next to a long one must not lose the tokens it was promised.
            p, m = max(longest, len(job.prompt)), max(budget, job.max_new_tokens)
            if batch and p + m > ctx:
                continue
            batch.append(job)
            rows, longest, budget = rows + job.n, p, m
        taken = {id(j) for j in batch}
        self._waiting = [j for j in self._waiting if id(j) not in taken]
        return batch

    def _run(self, batch: list[Job]) -> None:
        rows = [(job, c) for job in batch for c in range(job.n)]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))

        def on_token(i: int, text: str) -> bool:
            job, choice = rows[i]
            if job.cancelled.is_set():
                return False
            job.emit("delta", (choice, text))
            return True

        stops = [job.stop or None for job, _ in rows]
        try:
            outs = self.engines[batch[0].model].generate(
                [job.prompt for job, _ in rows],
                max_new_tokens=[job.max_new_tokens for job, _ in rows],
                temperature=[job.temperature for job, _ in rows],
                top_p=[job.top_p for job, _ in rows],
                top_k=[job.top_k for job, _ in rows],
                stop=stops if any(stops) else None,
                seed=[_row_seed(job.seed, c) for job, c in rows],
                on_token=on_token)
        except Exception as e:  # noqa: BLE001 — the request gets the error; the worker must live on
            for job in batch:
                job.emit("error", e)
            return
        self.stats["cancelled_rows"] += sum(o.finish_reason == "cancelled" for o in outs)
        i = 0
        for job in batch:
            job.emit("done", outs[i: i + job.n])
            i += job.n


def _drop_if_cancelled(job: Job) -> bool:
    if job.cancelled.is_set():
        job.emit("error", RuntimeError("cancelled"))
        return True
    return False


def _row_seed(seed: int | None, choice: int) -> int | None:
    """Choice c of a seeded request draws from its own seed: the n choices differ from one another, and
    none depends on where the request sits in the batch (the engine uses a list of seeds as given)."""
    return None if seed is None else (seed * 1_000_003 + choice) % 2**63
