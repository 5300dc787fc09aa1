"""The chat server's tables (prefix `chat_`; Alembic branch `chat`).

A conversation is a tree of messages: `parent_id` links a message to the one it answers or follows,
so a regenerated answer is a SIBLING of the earlier one (same parent) and an edited question is a
sibling of the original question. Users of the page are anonymous: a browser cookie, stored only as
a pseudonym (a hash of it).
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from alignloop.db import Base


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> datetime:
    return datetime.now(timezone.utc)


class Conversation(Base):
    __tablename__ = "chat_conversations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user: Mapped[str] = mapped_column(String(64), index=True)
    title: Mapped[str] = mapped_column(String(200), default="")
    model: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Message(Base):
    __tablename__ = "chat_messages"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("chat_conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("chat_messages.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model: Mapped[str | None] = mapped_column(String(200))           # assistant turns: who wrote it
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Feedback(Base):
    """A thumb on an assistant message, with an optional reason; one per message and user (the latest)."""
    __tablename__ = "chat_feedback"
    __table_args__ = (UniqueConstraint("message_id", "user", name="uq_chat_feedback_message_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("chat_messages.id", ondelete="CASCADE"), index=True)
    user: Mapped[str] = mapped_column(String(64))
    rating: Mapped[str] = mapped_column(String(8))                   # "up" | "down"
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Battle(Base):
    """One arena round: the same prompt to two anonymous models."""
    __tablename__ = "chat_battles"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user: Mapped[str] = mapped_column(String(64), index=True)
    prompt: Mapped[list] = mapped_column(JSON)                       # messages
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    answer_a: Mapped[str | None] = mapped_column(Text)
    answer_b: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Vote(Base):
    __tablename__ = "chat_votes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    battle_id: Mapped[str] = mapped_column(ForeignKey("chat_battles.id", ondelete="CASCADE"), unique=True)
    user: Mapped[str] = mapped_column(String(64))
    winner: Mapped[str] = mapped_column(String(16))                  # "a" | "b" | "tie" | "both_bad"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
