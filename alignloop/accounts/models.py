"""The account tables. They keep the names the labeling app's first migration gave them
(`label_0001_labeling_initial.py` creates `label_users` and `label_sessions`); the chat server logs
people in against the same rows, so they stay this simple."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Boolean, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from alignloop.db import Base

ROLES = ("admin", "reviewer", "labeler")


def now() -> datetime:
    return datetime.now(timezone.utc)


class User(Base):
    """An account: a name, a password hash and one of ROLES. Deactivated accounts keep their rows
    (their labels stay attributed) but cannot log in."""
    __tablename__ = "label_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Session(Base):
    """A login: the cookie holds a random token, the table only its SHA-256 (a leaked table logs no one in)."""
    __tablename__ = "label_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("label_users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
