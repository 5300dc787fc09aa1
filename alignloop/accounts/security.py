"""Passwords (argon2id), sessions (a random token in an HttpOnly SameSite cookie, only its hash in the
database) and CSRF tokens (one per session, checked on every POST)."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select

from alignloop.accounts.models import Session, User, now

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY = _hasher.hash("not a password")
# Both apps set and read the same cookies, so one login serves both when they share a host.
SESSION_COOKIE, LOGIN_CSRF_COOKIE = "label_session", "label_login_csrf"
SESSION_DAYS = 14


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(user: User | None, password: str) -> bool:
    """Constant work whether or not the user exists (no account enumeration by timing)."""
    try:
        return _hasher.verify(user.password_hash if user else _DUMMY, password) and user is not None
    except (VerificationError, InvalidHashError):
        return False


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_session(db, user: User) -> str:
    """Start a session; returns the cookie token (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    db.add(Session(token_hash=_digest(token), user_id=user.id, csrf=secrets.token_urlsafe(32),
                   expires_at=now() + timedelta(days=SESSION_DAYS)))
    db.execute(delete(Session).where(Session.user_id == user.id, Session.expires_at < now()))
    return token


def session_user(db, token: str | None) -> tuple[User, Session] | None:
    """The active user behind a cookie token, or None (no, unknown or expired session, inactive user)."""
    if not token:
        return None
    row = db.execute(select(User, Session).join(Session, Session.user_id == User.id)
                     .where(Session.token_hash == _digest(token))).first()
    if row is None:
        return None
    user, sess = row
    expires = sess.expires_at if sess.expires_at.tzinfo else sess.expires_at.replace(tzinfo=now().tzinfo)
    if not user.active or expires < now():
        return None
    return user, sess


def close_sessions_of(db, user_id: int, keep: str | None = None) -> None:
    """End every session of an account (after a password change), except the one holding `keep`."""
    q = delete(Session).where(Session.user_id == user_id)
    if keep:
        q = q.where(Session.token_hash != _digest(keep))
    db.execute(q)


def close_session(db, token: str | None) -> None:
    if token:
        db.execute(delete(Session).where(Session.token_hash == _digest(token)))


def same(a: str | None, b: str | None) -> bool:
    """Two tokens are present and equal (compared in constant time)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
