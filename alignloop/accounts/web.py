"""What the login and logout routes of both apps share. Each app keeps its own routes (its own
pages, error shapes and login-form token handling); the cookies they set are these, so a session
opened by one app is the same session in the other."""
from __future__ import annotations

from alignloop.accounts.security import LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_DAYS


def safe_next(path: str) -> str:
    """Where to go after logging in: a path on this site only (`//host` and `\\` would leave it)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


def set_session_cookie(resp, token: str, request) -> None:
    """The session cookie of a fresh login (HttpOnly; SameSite=Lax, so a link from elsewhere still
    arrives logged in; Secure behind https). The login form's token cookie has done its work."""
    resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", max_age=SESSION_DAYS * 86400,
                    path="/", secure=request.url.scheme == "https")
    resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")


def clear_session_cookie(resp) -> None:
    resp.delete_cookie(SESSION_COOKIE, path="/")
