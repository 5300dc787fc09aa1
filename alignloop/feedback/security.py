"""Passwords (argon2id), sessions (random token in an HttpOnly SameSite cookie, its hash in the
database), CSRF tokens (one per session, checked on every POST) and login rate limiting.

One account system serves both web apps: the labeling app (`alignloop label`) and the chat page and
arena (`alignloop serve`) read the same `label_users` and `label_sessions` tables of the run's
database, so a person has one account, one role and one password for both."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select

from alignloop.feedback.models import Session, User, now

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY = _hasher.hash("not a password")
SESSION_COOKIE, LOGIN_CSRF_COOKIE = "label_session", "label_login_csrf"
SESSION_DAYS = 14
MIN_PASSWORD = 8


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
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


class RateLimiter:
    """At most `limit` failed logins per `window` seconds per key (a username, or a client address).
    Kept in memory: the app runs as one server process (`alignloop label`)."""

    def __init__(self, limit: int, window: float = 300.0):
        self.limit, self.window = limit, window
        self._fails: dict[str, deque] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, t: float) -> deque:
        q = self._fails.setdefault(key, deque())
        while q and q[0] < t - self.window:
            q.popleft()
        if not q:
            del self._fails[key]  # the table does not grow with every address ever seen
            return deque()
        return q

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0: now)."""
        t = time.monotonic()
        with self._lock:
            q = self._recent(key, t)
            return q[0] + self.window - t if len(q) >= self.limit else 0.0

    def take(self, key: str) -> float:
        """Count one use of `key` if it has room: 0.0 when it had (the use is counted), else the seconds
        until it has (nothing counted). For rate limits on actions: messages, battles, votes."""
        t = time.monotonic()
        with self._lock:
            q = self._recent(key, t)
            if len(q) >= self.limit:
                return q[0] + self.window - t
            self._fails.setdefault(key, deque()).append(t)
            return 0.0

    def clear_prefix(self, prefix: str) -> int:
        with self._lock:
            keys = [k for k in self._fails if k.startswith(prefix)]
            for k in keys:
                del self._fails[k]
            return len(keys)

    def failed(self, key: str) -> None:
        with self._lock:
            self._fails.setdefault(key, deque()).append(time.monotonic())

    def clear(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


class LoginThrottle:
    """Failed logins are counted per (account, client address) and per address. A stranger who types
    wrong passwords for a real user's name blocks only that pair (and, past a higher limit, their own
    address); the real user, from their own address, still logs in. `unlock` (an admin's button)
    forgets the failures of one account."""

    def __init__(self, limit: int = 5, window: float = 300.0, per_address: int = 20):
        self.pair, self.addr = RateLimiter(limit, window), RateLimiter(per_address, window)

    @staticmethod
    def _keys(username: str, address: str) -> tuple[str, str]:
        return f"u:{username.lower()}|a:{address}", f"a:{address}"

    def wait(self, username: str, address: str) -> float:
        pk, ak = self._keys(username, address)
        return max(self.pair.wait(pk), self.addr.wait(ak))

    def failed(self, username: str, address: str) -> None:
        pk, ak = self._keys(username, address)
        self.pair.failed(pk)
        self.addr.failed(ak)

    def succeeded(self, username: str, address: str) -> None:
        self.pair.clear(self._keys(username, address)[0])

    def unlock(self, username: str) -> int:
        return self.pair.clear_prefix(f"u:{username.lower()}|")


def client_address(request) -> str:
    return request.client.host if request.client else "?"
