"""What every route of the labeling app shares: who is asking (`Site.me`: the session, the role and,
on a POST, the CSRF token), rendering a page, the flash messages, reading a form or an upload, and
the headers every answer carries.

The routes (`feedback/routes/`) are declared at module level (`alignloop.routing.Routes`), so they
hold no state: the state of one app (its database, run directory, sampling job, login throttle and
templates) is the `Site` on `app.state.site`, found from the request with `site_of`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import HTTPException, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from jinja2 import Environment
from sqlalchemy.orm import sessionmaker

from alignloop.accounts.models import User
from alignloop.accounts.security import SESSION_COOKIE, same, session_user
from alignloop.accounts.throttle import LoginThrottle
from alignloop.errors import InputError
from alignloop.feedback.sampling import Sampler

# Ids in paths: a number a database column can hold (a larger one is a 422, not a crash of the driver).
Id = Annotated[int, PathParam(ge=1, le=2**31 - 1)]
LETTERS = "ABCDEFGHI"
STAFF = ("admin", "reviewer")
# The flash message a redirect asks for with ?m=…&n=…&w=… (the page shows it once, nothing is stored).
MESSAGES = {"imported": "Imported {n} items.",
            "imported_k": "Imported {n} items. Warning: {w} of them do not have this project's K answers; they are "
                          "shown with the answers they have.", "created": "Created.", "sampling": "Sampling started.",
            "saved": "Saved.", "released": "Released {n} open tasks.", "unlocked": "Unlocked: failed logins forgotten.",
            "reset": "New password set; the account's sessions were closed.", "password": "Your password was changed."}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class SecurityHeaders:
    """CSP, no sniffing, no framing, no caching of pages (a plain ASGI middleware: Starlette's
    BaseHTTPMiddleware costs a task group and two streams per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"cache-control" or static]
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, send_with_headers)


class NeedLogin(Exception):
    """No valid session: the app answers with a redirect to /login (see `app.py`)."""


class Page(Exception):
    """Answer with a rendered page (an error shown where the user is)."""

    def __init__(self, status: int, template: str, **ctx):
        self.status, self.template, self.ctx = status, template, ctx


class Me:
    """The logged-in user of one request, with the session's CSRF token (every form carries it back)
    and the cookie token (to close or keep this session)."""

    def __init__(self, user: User, csrf: str, token: str):
        self.user, self.csrf, self.token = user, csrf, token
        self.id, self.role, self.name = user.id, user.role, user.username

    def ctx(self, **kw) -> dict:
        return {"user": self.user, "csrf": self.csrf, **kw}


@dataclass
class Site:
    """The state of one labeling app; `create_app` makes it, every route reads it."""
    Sess: sessionmaker
    run_dir: Path
    sampler: Sampler
    throttle: LoginThrottle
    env: Environment
    max_upload_bytes: int

    def write(self, work):
        """`work(db)` in one transaction: (its result, None), or (None, the message) when it refused bad input
        (an `InputError`, which rolled the transaction back) for the page to show."""
        try:
            with self.Sess.begin() as db:
                return work(db), None
        except InputError as e:
            return None, str(e)

    def render(self, template: str, status: int = 200, **ctx) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(template).render(**ctx), status_code=status)

    def me(self, request: Request, roles=None, form=None) -> Me:
        """The user behind the session cookie, checked first on every page: NeedLogin without one,
        403 for another role, and with `form` (a POST) 403 unless the session's CSRF token came back
        (the form's `csrf` field, or the X-CSRF-Token header of the ranking page's script)."""
        token = request.cookies.get(SESSION_COOKIE)
        with self.Sess() as db:
            found = session_user(db, token)
        if found is None:
            raise NeedLogin()
        user, sess = found
        if form is not None and not same(form.get("csrf") or request.headers.get("x-csrf-token"), sess.csrf):
            raise HTTPException(403, "Missing or invalid CSRF token: reload the page and try again.")
        if roles and user.role not in roles:
            raise HTTPException(403, "Your role may not open this page.")
        return Me(user, sess.csrf, token)


def site_of(request: Request) -> Site:
    return request.app.state.site


def message(request: Request) -> str | None:
    """The flash message the URL asks for, or None (unknown keys show nothing)."""
    m, n, w = (request.query_params.get(k, "") for k in ("m", "n", "w"))
    return MESSAGES[m].format(n=int(n) if n.isdigit() else 0, w=int(w) if w.isdigit() else 0) if m in MESSAGES else None


async def read_form(request: Request):
    return await request.form()


async def read_upload(request: Request):
    """The form of an upload, its body capped at max_upload_bytes (+ room for the other fields); None
    when it is bigger, so that a huge file is refused without being held in memory."""
    cap = site_of(request).max_upload_bytes + 64 * 1024
    declared = request.headers.get("content-length")
    body, too_big = bytearray(), declared is not None and declared.isdigit() and int(declared) > cap
    async for chunk in request.stream():
        if not too_big:
            body += chunk
            too_big = len(body) > cap
        if too_big and len(body) > 4 * cap:  # drain a little so the browser sees the answer
            break
    if too_big:
        return None
    request._body = bytes(body)  # Starlette re-reads a cached body when parsing the form
    return await request.form(max_files=1)
