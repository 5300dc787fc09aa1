"""Logging in and out of the labeling app, and the health check: the only routes open without a
session. The account system behind them is `alignloop.accounts` (the chat server logs in against the
same accounts)."""
from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, Request
from fastapi.responses import PlainTextResponse, RedirectResponse

from alignloop.accounts.security import LOGIN_CSRF_COOKIE, close_session, same
from alignloop.accounts.throttle import client_address
from alignloop.accounts.users import authenticate
from alignloop.accounts.web import clear_session_cookie, safe_next, set_session_cookie
from alignloop.feedback.web import read_form, site_of
from alignloop.routing import Routes

routes = Routes()


@routes.get("/healthz")
def healthz():
    return PlainTextResponse("ok")


@routes.get("/login")
def login_page(request: Request):
    # A fresh token for the login form, in a cookie only /login sees: a form posted from another site
    # cannot carry it (the session's own CSRF token does not exist yet).
    token = secrets.token_urlsafe(32)
    resp = site_of(request).render("login.html", csrf=token, user=None,
                                   next=safe_next(request.query_params.get("next", "/")))
    resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/login",
                    secure=request.url.scheme == "https")
    return resp


@routes.post("/login")
def login(request: Request, form=Depends(read_form)):
    site = site_of(request)
    if not same(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE)):
        raise HTTPException(403, "Missing or invalid CSRF token: reload the login page and try again.")
    username, password = (form.get("username") or "").strip(), form.get("password") or ""
    nxt = safe_next(form.get("next") or "/")
    addr = client_address(request)
    wait = site.throttle.wait(username, addr)
    if wait > 0:
        resp = site.render("login.html", 429, csrf=form.get("csrf"), user=None, next=nxt,
                           error=f"Too many failed logins from here: try again in {int(wait) + 1} seconds.")
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    token = authenticate(site.Sess, username, password)
    if token is None:
        site.throttle.failed(username, addr)
        return site.render("login.html", 401, csrf=form.get("csrf"), user=None, next=nxt,
                           error="Wrong username or password.")
    site.throttle.succeeded(username, addr)
    resp = RedirectResponse(nxt, status_code=303)
    set_session_cookie(resp, token, request)
    return resp


@routes.post("/logout")
def logout(request: Request, form=Depends(read_form)):
    site = site_of(request)
    m = site.me(request, form=form)
    with site.Sess.begin() as db:
        close_session(db, m.token)
    resp = RedirectResponse("/login", status_code=303)
    clear_session_cookie(resp)
    return resp
