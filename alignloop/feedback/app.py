"""The labeling web app: server-rendered pages (Jinja2, autoescaped) and one small script for ranking.

Every page checks the session and the role; every POST checks the session's CSRF token. Labelers
see only their own tasks (another person's task answers 404, as if it did not exist); reviewers and
admins see every answer on an item. Prompts and model outputs are untrusted text: autoescaping plus
a Content-Security-Policy without inline scripts.

Where things are: `create_app` (here) builds one app from the run's database and puts its state in a
`Site` (`web.py`: the session check, rendering, forms, security headers); the routes are one router
per area in `routes/` (its docstring lists them); the accounts are `alignloop.accounts`.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.accounts.models import ROLES
from alignloop.accounts.throttle import LoginThrottle
from alignloop.feedback import store
from alignloop.feedback.models import KINDS
from alignloop.feedback.routes import export, home, login, people, projects, review, tasks
from alignloop.feedback.sampling import Sampler
from alignloop.feedback.web import LETTERS, NeedLogin, Page, SecurityHeaders, Site

HERE = Path(__file__).parent
# What 1 and 7 mean on each rating scale (shown once above the answers, read by screen readers with
# every menu): anchors make one labeler's 5 mean what another's does.
RATING_ANCHORS = (("helpful", "no help", "fully does what was asked"), ("truthful", "false claims", "all true"),
                  ("harmless", "harmful", "no harm"))


def ranking_text(r: dict) -> str:
    """{"ranking": [1, 0, 2], "ties": [[0, 1]]} → "2 = 1 > 3" (answer numbers from 1)."""
    group = {i: n for n, g in enumerate(r.get("ties") or []) for i in g}
    out = str(r["ranking"][0] + 1)
    for a, b in zip(r["ranking"], r["ranking"][1:]):
        out += (" = " if a in group and group[a] == group.get(b) else " > ") + str(b + 1)
    return out


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["ranking_text"] = ranking_text
    env.globals.update(letters=LETTERS, roles=ROLES, kinds=KINDS, criteria=store.CRITERIA, flags=store.FLAGS,
                       rating_anchors=RATING_ANCHORS)
    return env


def create_app(run_dir, db_url: str | None = None, *, max_upload_bytes: int = 20 << 20,
               login_limit: int = 5, login_window: float = 300.0, throttle: LoginThrottle | None = None,
               device: str = "auto", dtype: str = "auto") -> FastAPI:
    run_dir = Path(run_dir)
    Sess = store.open_db(run_dir, db_url)
    site = Site(Sess, run_dir, Sampler(run_dir, Sess, device, dtype),
                throttle or LoginThrottle(login_limit, login_window, login_limit * 4), templates(),
                max_upload_bytes)

    # The schema lists every route (forms are read by hand, so their fields are not in it); no /docs,
    # whose page would load scripts from a CDN.
    app = FastAPI(title="alignloop label", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.site = site
    # also on app.state itself, as before: the CLI and the tests open the database through app.state.Sess
    app.state.Sess, app.state.run_dir = Sess, run_dir
    app.state.sampler, app.state.throttle = site.sampler, site.throttle
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(SecurityHeaders)
    add_error_pages(app, site)
    for area in (login, home, people, projects, tasks, review, export):  # the order of /openapi.json's paths
        area.routes.add_to(app)
    return app


def add_error_pages(app: FastAPI, site: Site) -> None:
    """Errors are pages too: no session goes to the login page (and back after it, for a GET), an
    HTTP error shows error.html, and `Page` renders the page the user was on, with its error."""
    @app.exception_handler(NeedLogin)
    async def need_login(request: Request, _):
        nxt = request.url.path if request.method == "GET" else "/"
        return RedirectResponse(f"/login?next={quote(nxt)}", status_code=303)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and Starlette's own 404/405
    async def http_error(request: Request, e: StarletteHTTPException):
        return site.render("error.html", e.status_code, title="Error", message=e.detail, user=None, csrf=None)

    @app.exception_handler(Page)
    async def page(request: Request, e: Page):
        return site.render(e.template, e.status, **e.ctx)
