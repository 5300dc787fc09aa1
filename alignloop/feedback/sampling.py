"""Sample K answers per prompt from a model of the run, in a background thread of the server.

One job at a time; the model and its engine stay loaded for the next job. Items get their answers
in chunks, each chunk committed, so labelers can start on the first items while the rest are sampled.
"""
from __future__ import annotations

import threading
import traceback
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import sessionmaker

from alignloop.feedback import store
from alignloop.feedback.models import Item, Project
from alignloop.rundir import current_policy, stage_models


def models_of(run_dir: Path) -> dict[str, Path]:
    """The run's policies by name, the current one first as "current"."""
    found = {}
    cur = current_policy(run_dir)
    if cur is not None:
        found["current"] = cur
    found.update(stage_models(run_dir))
    return found


class Sampler:
    def __init__(self, run_dir: Path, Sess: sessionmaker, device: str = "auto", dtype: str = "auto"):
        self.run_dir, self.Sess = Path(run_dir), Sess
        self.device, self.dtype = device, dtype  # `alignloop label --device --dtype`
        self.status: dict = {"state": "idle"}
        self._lock = threading.Lock()
        self._engines: dict[Path, object] = {}
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, project_id: int, model: str, k: int, max_new_tokens: int = 64, temperature: float = 1.0,
              top_p: float = 1.0, chunk: int = 8) -> None:
        """Raises ValueError for an unknown model or when a job is already running."""
        models = models_of(self.run_dir)
        if model not in models:
            raise ValueError(f"no model {model!r} in this run (have: {', '.join(models) or 'none'})")
        with self._lock:
            if self.busy():
                raise ValueError("a sampling job is already running; wait for it to finish")
            self.status = {"state": "running", "project": project_id, "model": model, "done": 0, "total": 0,
                           "message": "loading the model"}
            self._thread = threading.Thread(
                target=self._run, args=(project_id, model, models[model], k, max_new_tokens, temperature, top_p,
                                        chunk), name="label-sampler", daemon=True)
            self._thread.start()

    def _engine(self, path: Path):
        if path not in self._engines:
            from alignloop.engine import Engine
            from alignloop.model import load_for_inference
            from alignloop.sources import tokenizer_dir
            from alignloop.tokenizer import ChatTokenizer
            tok = ChatTokenizer.load(tokenizer_dir(path, self.run_dir))
            model, device = load_for_inference(path, self.device, self.dtype)
            self._engines[path] = Engine(model, tok, device)
        return self._engines[path]

    def _run(self, project_id, name, path, k, max_new_tokens, temperature, top_p, chunk):
        from alignloop.sample import distinct_answers  # here: it loads torch, which the app starts without
        try:
            engine = self._engine(path)
            with self.Sess() as db:
                if db.get(Project, project_id) is None:
                    raise ValueError("the project was deleted")
                todo = db.execute(select(Item.id, Item.prompt).where(
                    Item.project_id == project_id, Item.completions.is_(None)).order_by(Item.id)).all()
            self.status.update(total=len(todo), message="sampling")
            skipped = missing = 0
            for s in range(0, len(todo), chunk):
                part = []
                for item_id, prompt in todo[s: s + chunk]:
                    p = engine.tok.render_prompt(prompt)
                    if len(p) + max_new_tokens > engine.ctx:  # does not fit the model's context
                        skipped += 1
                    else:
                        part.append((item_id, p))
                # up to six draws, the labeling app's number since it has had one (`alignloop sample` draws 3)
                answers = distinct_answers(engine, [p for _, p in part], k, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_p=top_p, tries=6)
                with store.writing(self.Sess), self.Sess.begin() as db:
                    for (item_id, _), got in zip(part, answers):
                        if len(got) < k:
                            missing += 1
                            continue
                        db.execute(update(Item).where(Item.id == item_id, Item.completions.is_(None))
                                   .values(completions=got, ready=True, source=f"model:{name}")
                                   .execution_options(synchronize_session=False))
                self.status["done"] = min(s + chunk, len(todo))
            sampled = len(todo) - skipped - missing
            note = f"; {skipped} prompts too long for the model's context were left out" if skipped else ""
            if missing:
                note += f"; {missing} prompts got fewer than {k} distinct answers (sample again to retry)"
            self.status.update(state="done", message=f"sampled {k} answers for {sampled} prompts{note}")
        except Exception as e:  # reported on the project page; the server keeps serving
            traceback.print_exc()
            self.status.update(state="error", message=f"{type(e).__name__}: {e}")
