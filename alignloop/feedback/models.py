"""The labeling app's tables (all prefixed `label_`; the migration `label_0001_labeling_initial.py`
creates exactly these, with the account tables of `alignloop.accounts.models`).

The queue's guarantees live in the schema, so they hold under any number of server threads or
processes on SQLite and PostgreSQL alike:
- one task per (item, labeler): a unique constraint, so no item reaches the same person twice;
- at most `overlap` live tasks per item: a slot is claimed by a conditional UPDATE of
  `label_items.n_assigned` (`... WHERE n_assigned < overlap`), which is atomic on both databases;
- a task is answered once: its status moves `assigned → submitted` by a conditional UPDATE.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

# Tasks and settled items point at accounts (label_users): importing the account tables puts them in
# the same metadata, so those foreign keys resolve whichever module a program imports first.
from alignloop.accounts.models import User, now  # noqa: F401
from alignloop.db import Base

KINDS = ("ranking", "demonstration")


class Setting(Base):
    """Install-wide values, e.g. the secret behind stable labeler pseudonyms."""
    __tablename__ = "label_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Project(Base):
    __tablename__ = "label_projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))            # "ranking" | "demonstration"
    k: Mapped[int] = mapped_column(Integer, default=4)        # answers sampled per prompt (2…9)
    overlap: Mapped[int] = mapped_column(Integer, default=1)  # labelers per item (N)
    instructions: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Item(Base):
    """One prompt (messages) and, for ranking, its K answers (imported or sampled)."""
    __tablename__ = "label_items"
    __table_args__ = (Index("ix_label_items_queue", "project_id", "ready", "n_assigned"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("label_projects.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[list] = mapped_column(JSON)
    completions: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    source: Mapped[str] = mapped_column(String(300), default="import")
    ready: Mapped[bool] = mapped_column(Boolean, default=False)   # can be handed out
    n_assigned: Mapped[int] = mapped_column(Integer, default=0)   # live tasks (assigned + submitted)
    n_done: Mapped[int] = mapped_column(Integer, default=0)       # submitted tasks
    # {"ranking", "ties"}: the gold ranking an admin marked, and the ranking a reviewer settled on
    gold: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    resolution: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    resolved_by: Mapped[int | None] = mapped_column(ForeignKey("label_users.id"), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # label_0002
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Task(Base):
    """An item handed to one labeler; `shown[p]` is the answer index shown at position p (shuffled)."""
    __tablename__ = "label_tasks"
    __table_args__ = (UniqueConstraint("item_id", "user_id", name="uq_label_tasks_item_user"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("label_items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("label_users.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("label_projects.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="assigned")  # assigned | submitted | skipped
    shown: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    answer: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    skip_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # ms from the task page's load to the submission, as the browser measured it (label_0003)
    elapsed_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
