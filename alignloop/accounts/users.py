"""Creating accounts and checking logins, independent of the web layer: the labeling app's admin
pages, `alignloop label create-admin`, both login forms and the tests go through these functions."""
from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from alignloop.accounts.models import ROLES, User
from alignloop.accounts.security import hash_password, open_session, verify_password
from alignloop.errors import InputError

USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8


def check_account(username: str, password: str, role: str) -> str:
    """The checks of a new account that need no database; returns the cleaned username."""
    username = (username or "").strip()
    if not USERNAME.match(username):
        raise InputError("a username is 1–64 letters, digits or . _ - @", field="username")
    if role not in ROLES:
        raise InputError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", field="role")
    check_password(password)
    return username


def check_password(password: str) -> None:
    if len(password or "") < MIN_PASSWORD:
        raise InputError(f"a password needs at least {MIN_PASSWORD} characters", field="password")
    if len(password) > 1024:
        raise InputError("a password has at most 1024 characters", field="password")


def create_user(db, username: str, password: str, role: str) -> User:
    username = check_account(username, password, role)
    if db.scalar(select(User.id).where(User.username == username)) is not None:
        raise InputError(f"the username {username!r} is taken", field="username")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    db.add(user)
    try:
        db.flush()
    except IntegrityError:  # created by someone else between the check and the insert
        db.rollback()
        raise InputError(f"the username {username!r} is taken", field="username") from None
    return user


def authenticate(Session, username: str, password: str) -> str | None:
    """A new session's cookie token when `password` is right for an active account, else None. The
    same answer (None) for an unknown name, a wrong password and a deactivated account, so a login
    form does not tell which names exist."""
    with Session() as db:
        user = db.scalar(select(User).where(User.username == username))
        if not verify_password(user, password) or not user.active:
            return None
        token = open_session(db, user)
        db.commit()
        return token
