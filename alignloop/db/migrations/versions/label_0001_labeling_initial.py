"""labeling: accounts, sessions, settings, projects, items, tasks (the `label_` tables).

Revision ID: label_0001
Revises: (base of the `labeling` branch)
"""
import sqlalchemy as sa
from alembic import op

revision = "label_0001"
down_revision = None
branch_labels = ("labeling",)
depends_on = None

TZ = sa.DateTime(timezone=True)



def upgrade() -> None:
    op.create_table(
        "label_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False, server_default=sa.true()),
    )
    op.create_table(
        "label_sessions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer,
                  sa.ForeignKey("label_users.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("expires_at", TZ, nullable=False),
    )
    op.create_table(
        "label_settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "label_projects",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("k", sa.Integer, nullable=False),
        sa.Column("overlap", sa.Integer, nullable=False),
        sa.Column("instructions", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_table(
        "label_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("project_id", sa.Integer,
                  sa.ForeignKey("label_projects.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("prompt", sa.JSON, nullable=False),
        sa.Column("completions", sa.JSON, nullable=True),
        sa.Column("source", sa.String(300), nullable=False),
        sa.Column("ready", sa.Boolean, nullable=False),
        sa.Column("n_assigned", sa.Integer, nullable=False),
        sa.Column("n_done", sa.Integer, nullable=False),
        sa.Column("gold", sa.JSON, nullable=True),
        sa.Column("resolution", sa.JSON, nullable=True),
        sa.Column("resolved_by", sa.Integer, sa.ForeignKey("label_users.id"), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
    )
    op.create_index("ix_label_items_queue", "label_items", ["project_id", "ready", "n_assigned"])
    op.create_table(
        "label_tasks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("item_id", sa.Integer,
                  sa.ForeignKey("label_items.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("user_id", sa.Integer,
                  sa.ForeignKey("label_users.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("project_id", sa.Integer,
                  sa.ForeignKey("label_projects.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("shown", sa.JSON, nullable=True),
        sa.Column("answer", sa.JSON, nullable=True),
        sa.Column("skip_reason", sa.Text, nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("submitted_at", TZ, nullable=True),
        sa.UniqueConstraint("item_id", "user_id", name="uq_label_tasks_item_user"),
    )


def downgrade() -> None:
    for table in ("label_tasks", "label_items", "label_projects", "label_settings", "label_sessions", "label_users"):
        op.drop_table(table)
