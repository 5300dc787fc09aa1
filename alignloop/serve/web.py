"""The chat page (`/`), the arena (`/arena`) and the small JSON/SSE API behind them (`/api/…`): what
their routes share. The routes are `serve/routes/` (login, chat, arena); `app.add_pages` puts them on
the server's app.

Pages are rendered on the server (Jinja, autoescaped) and driven by a little plain JS that reads
server-sent events from `fetch`; every user or model text reaches the DOM through `textContent`, and a
Content-Security-Policy allows only this server's own scripts.

Who may use them: the run's accounts — the labeling app's users, roles and sessions (one account
system, see `alignloop.accounts`). `Gate` lets no request through to a page or `/api/…` without a
session (pages redirect to `/login`, the API answers 401); a POST also needs the session's CSRF token
in `X-CSRF-Token`. With `--open` (a private demo) anyone may use them, anonymously: a random cookie,
stored only as its pseudonym (a hash), owns the visitor's conversations, and every page says so.
The OpenAPI schema, `/static/` and `/login` are public; `/v1` keeps its API keys.

Rate limits (429 with Retry-After): per account `messages_per_minute` (20) chat messages and
regenerations, `battles_per_minute` (10) battles and `votes_per_minute` (20) votes; per client address
four times as many (`per_address_factor`), which is what bounds anonymous cookies on an open server.
One vote per battle, and a battle belongs to the account that started it.

Streams (`text/event-stream`): `meta` (ids), `delta` ({text} or {side, text}), `done`, or `error`.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from alignloop.accounts.models import User
from alignloop.accounts.security import SESSION_COOKIE, same, session_user
from alignloop.accounts.throttle import LoginThrottle, RateLimiter, client_address
from alignloop.db import sessions
from alignloop.serve.arena import MIN_BATTLES
from alignloop.serve.errors import APIError, error_body
from alignloop.serve.scheduler import Generator
from alignloop.serve.tables import Feedback, Message

HERE = Path(__file__).parent
COOKIE = "alignloop_user"
# Everything else needs a session (or --open). /favicon.ico answers 404 like any unknown path: a login
# redirect there would make the browser fetch a fresh login page behind the user's back.
PUBLIC = ("/login", "/logout", "/static/", "/openapi.json", "/v1/", "/favicon.ico")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Account:
    """The logged-in account of a request, as the pages need it."""

    def __init__(self, user: User, csrf: str):
        self.name, self.role, self.csrf = user.username, user.role, csrf


class Gate:
    """No page and no `/api/…` without a session of the run's accounts (unless the server is open): a
    pure ASGI middleware in front of every route, so a route added later is guarded too. It puts the
    account (or None) into `request.state.account`."""

    def __init__(self, app, Session, open_: bool):
        self.app, self.Session, self.open = app, Session, open_

    def _lookup(self, token: str) -> Account | None:
        with self.Session() as s:
            found = session_user(s, token)
            return Account(found[0], found[1].csrf) if found else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        token = request.cookies.get(SESSION_COOKIE)
        account = await run_in_threadpool(self._lookup, token) if token and len(token) < 200 else None
        scope.setdefault("state", {})["account"] = account
        path = scope["path"]
        if path.startswith(PUBLIC) or path == "/v1":
            return await self.app(scope, receive, send)
        if account is None and not self.open:
            if path.startswith("/api/") or scope["method"] not in ("GET", "HEAD"):
                resp = JSONResponse(error_body("Log in first: the chat page and the arena need an account of "
                                               "this run (POST /login)", "invalid_request_error",
                                               code="not_logged_in"), status_code=401)
            else:
                resp = RedirectResponse(f"/login?next={quote(path)}", status_code=303)
            return await resp(scope, receive, send)
        if account is not None and scope["method"] == "POST" and not same(
                request.headers.get("x-csrf-token"), account.csrf):
            resp = JSONResponse(error_body("Missing or wrong CSRF token (X-CSRF-Token): reload the page",
                                           "invalid_request_error", code="csrf"), status_code=403)
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class Site:
    """The state of one server's pages: the database, the generator, the models on offer, the login
    throttle and the rate limits. `app.add_pages` makes it; routes find it with `site_of`."""

    def __init__(self, gen: Generator, db):
        self.gen, self.settings = gen, gen.settings
        self.Session = sessions(db)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.throttle = LoginThrottle()
        s, factor = self.settings, self.settings.per_address_factor
        self.limits = {kind: (RateLimiter(per_minute, 60.0), RateLimiter(per_minute * factor, 60.0))
                       for kind, per_minute in (("messages", s.messages_per_minute),
                                                ("battles", s.battles_per_minute), ("votes", s.votes_per_minute))}
        self.names = list(gen.models)
        # The arena and its leaderboard skip the `ppo` alias of a run's newest round: "round-N/ppo"
        # names the same model and keeps its meaning when more rounds are added.
        self.fighters = [n for n in self.names if not (n == "ppo" and any(
            o != n and self._same_model(o, n) for o in self.names))]
        self.newest = self._newest()

    def _same_model(self, a: str, b: str) -> bool:
        return self.gen.models[a].path.resolve() == self.gen.models[b].path.resolve()

    def _newest(self) -> str | None:
        """The chat page starts on the newest policy (the last round's PPO, under its round name), else
        SFT, else the first model served: the one people most want to talk to."""
        newest = next((n for n in ("ppo", "sft", "base") if n in self.names), self.names[0] if self.names else None)
        if newest == "ppo" and "ppo" not in self.fighters:
            aliases = [o for o in self.fighters if self._same_model(o, "ppo")]
            newest = next((o for o in reversed(aliases) if o.startswith("round-")), aliases[-1])
        return newest

    def page(self, request: Request, name: str, status: int = 200, **ctx) -> Response:
        """A page of templates/ with what every page shows (the models, the account and its CSRF token,
        whether the server is open); a first visit to an open server also gets its anonymous cookie."""
        account = getattr(request.state, "account", None)
        user, fresh = visitor(request)
        resp = self.templates.TemplateResponse(request, name, {
            "models": self.names, "newest": self.newest, "account": account, "min_battles": MIN_BATTLES,
            "open": self.settings.open, "csrf": account.csrf if account else "", **ctx}, status_code=status)
        resp.headers["Content-Security-Policy"] = CSP
        return with_cookie(resp, fresh)

    def limit(self, request: Request, kind: str, who: str) -> None:
        """Count one action; 429 with Retry-After when the account or the address is over its limit."""
        per_account, per_address = self.limits[kind]
        addr = client_address(request)
        wait = max(per_account.wait(who), per_address.wait(addr))
        if wait <= 0:
            wait = per_account.take(who) or per_address.take(addr)
        if wait > 0:
            n = per_account.limit
            raise APIError(429, f"Too many {kind}: at most {n} a minute per account "
                           f"({n * self.settings.per_address_factor} per address); try again in {int(wait) + 1} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(int(wait) + 1)})


def site_of(request: Request) -> Site:
    return request.app.state.site


def visitor(request: Request) -> tuple[str, str | None]:
    """(who, new cookie token or None): the account's username, or on an open server without a login
    the pseudonym `anon:<hash>` of a random cookie (":" is never in a username)."""
    account = getattr(request.state, "account", None)
    if account is not None:
        return account.name, None
    token = request.cookies.get(COOKIE)
    fresh = None
    if not token or len(token) > 100:
        token = fresh = secrets.token_urlsafe(24)
    return "anon:" + hashlib.sha256(token.encode()).hexdigest()[:12], fresh


def with_cookie(resp: Response, fresh: str | None) -> Response:
    if fresh:
        resp.set_cookie(COOKIE, fresh, max_age=365 * 86400, httponly=True, samesite="strict")
    return resp


def sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def message_json(m: Message, fb: Feedback | None = None) -> dict:
    return {"id": m.id, "parent_id": m.parent_id, "role": m.role, "content": m.content, "model": m.model,
            "finish_reason": m.finish_reason,
            "feedback": {"rating": fb.rating, "reason": fb.reason} if fb else None}
