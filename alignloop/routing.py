"""`Routes`: the routes of one area of a web app, declared in their own module with the usual
decorators (`@routes.get(path, …)`) and added to an app later, by `routes.add_to(app)`.

Why not FastAPI's `APIRouter`: `app.include_router` (FastAPI ≥ 0.16x) keeps an included router as one
nested entry of `app.routes`, so a walk over `app.routes` no longer meets every route — and both apps'
tests walk it to prove that no route answers without a session. `add_to` replays each decorator on the
app itself, with the same arguments: the app gets exactly the routes it would get from `@app.get(…)`
in one big function, in the order the modules declare them.
"""
from __future__ import annotations

from collections.abc import Callable


class Routes:
    def __init__(self):
        self._declared: list[tuple[str, str, dict, Callable]] = []

    def get(self, path: str, **kwargs) -> Callable:
        return self._declare("get", path, kwargs)

    def post(self, path: str, **kwargs) -> Callable:
        return self._declare("post", path, kwargs)

    def _declare(self, method: str, path: str, kwargs: dict) -> Callable:
        def decorate(endpoint: Callable) -> Callable:
            self._declared.append((method, path, kwargs, endpoint))
            return endpoint
        return decorate

    def add_to(self, app) -> None:
        for method, path, kwargs, endpoint in self._declared:
            getattr(app, method)(path, **kwargs)(endpoint)
