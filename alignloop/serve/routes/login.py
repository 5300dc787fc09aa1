"""Logging in to the chat page and the arena with an account of the run, and out. The accounts and
sessions are the labeling app's (`alignloop.accounts`); these routes only differ in their pages:
errors come back on this server's login page instead of an error page."""
from __future__ import annotations

import secrets

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from alignloop.accounts.security import LOGIN_CSRF_COOKIE, SESSION_COOKIE, close_session, same
from alignloop.accounts.throttle import client_address
from alignloop.accounts.users import authenticate
from alignloop.accounts.web import clear_session_cookie, safe_next, set_session_cookie
from alignloop.routing import Routes
from alignloop.serve.web import site_of

routes = Routes()


@routes.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request):
    # the token of an earlier visit is kept: a second tab (or a stray request) must not void the first
    token = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not token or len(token) > 100:
        token = secrets.token_urlsafe(32)
    resp = site_of(request).page(request, "login.html", login_csrf=token,
                                 next=safe_next(request.query_params.get("next", "/")))
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login")
    return resp


@routes.post("/login", response_class=HTMLResponse, include_in_schema=False)
async def login(request: Request):
    site = site_of(request)
    form = await request.form()
    nxt = safe_next(str(form.get("next") or "/"))
    if not same(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
        return site.page(request, "login.html", 403, login_csrf="", next=nxt,
                         error="Missing or invalid token: reload the login page and try again.")
    username, password = str(form.get("username") or "").strip(), str(form.get("password") or "")
    addr = client_address(request)
    wait = site.throttle.wait(username, addr)
    if wait > 0:
        resp = site.page(request, "login.html", 429, login_csrf=form.get("csrf"), next=nxt,
                         error=f"Too many failed logins from here: try again in {int(wait) + 1} seconds.")
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    # argon2 takes tens of milliseconds: off the event loop, which streams everyone's answers
    token = await run_in_threadpool(authenticate, site.Session, username, password)
    if token is None:
        site.throttle.failed(username, addr)
        return site.page(request, "login.html", 401, login_csrf=form.get("csrf"), next=nxt,
                         error="Wrong username or password.")
    site.throttle.succeeded(username, addr)
    resp = RedirectResponse(nxt, status_code=303)
    set_session_cookie(resp, token, request)
    return resp


@routes.post("/logout", include_in_schema=False)
async def logout(request: Request):
    account = getattr(request.state, "account", None)
    form = await request.form()
    # only a form of this session ends it (another site cannot log people out); the cookie goes anyway
    if account is not None and same(form.get("csrf"), account.csrf):
        def close():
            with site_of(request).Session.begin() as s:
                close_session(s, request.cookies.get(SESSION_COOKIE))
        await run_in_threadpool(close)
    resp = RedirectResponse("/login", status_code=303)
    clear_session_cookie(resp)
    return resp
