"""labeling: when a reviewer settled an item (`label_items.resolved_at`), so that every exported
comparison carries its time.

Revision ID: label_0002
Revises: label_0001
"""
import sqlalchemy as sa
from alembic import op

revision = "label_0002"
down_revision = "label_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("label_items", sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("label_items", "resolved_at")
