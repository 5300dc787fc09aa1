"""chat: conversations (message trees), feedback thumbs, arena battles and votes

Revision ID: chat_0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "chat_0001"
down_revision = None
branch_labels = ("chat",)
depends_on = None


def _when():
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "chat_conversations",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.Column("updated_at", _when(), nullable=False),
    )
    op.create_index("ix_chat_conversations_user", "chat_conversations", ["user"])
    op.create_table(
        "chat_messages",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("conversation_id", sa.String(32),
                  sa.ForeignKey("chat_conversations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("parent_id", sa.String(32), sa.ForeignKey("chat_messages.id", ondelete="CASCADE"), nullable=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", _when(), nullable=False),
    )
    op.create_index("ix_chat_messages_conversation_id", "chat_messages", ["conversation_id"])
    op.create_index("ix_chat_messages_parent_id", "chat_messages", ["parent_id"])
    op.create_table(
        "chat_feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(32), sa.ForeignKey("chat_messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("rating", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
        sa.UniqueConstraint("message_id", "user", name="uq_chat_feedback_message_user"),
    )
    op.create_index("ix_chat_feedback_message_id", "chat_feedback", ["message_id"])
    op.create_table(
        "chat_battles",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("model_a", sa.String(200), nullable=False),
        sa.Column("model_b", sa.String(200), nullable=False),
        sa.Column("answer_a", sa.Text(), nullable=True),
        sa.Column("answer_b", sa.Text(), nullable=True),
        sa.Column("created_at", _when(), nullable=False),
    )
    op.create_index("ix_chat_battles_user", "chat_battles", ["user"])
    op.create_table(
        "chat_votes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("battle_id", sa.String(32), sa.ForeignKey("chat_battles.id", ondelete="CASCADE"),
                  nullable=False, unique=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("winner", sa.String(16), nullable=False),
        sa.Column("created_at", _when(), nullable=False),
    )


def downgrade() -> None:
    for name in ("chat_votes", "chat_battles", "chat_feedback", "chat_messages", "chat_conversations"):
        op.drop_table(name)
