"""labeling: how long a labeler spent on a task (`label_tasks.elapsed_ms`, milliseconds from the task
page's load to its submission, measured by the browser), so that an admin sees each labeler's speed.

Revision ID: label_0003
Revises: label_0002
"""
import sqlalchemy as sa
from alembic import op

revision = "label_0003"
down_revision = "label_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("label_tasks", sa.Column("elapsed_ms", sa.Integer, nullable=True))


def downgrade() -> None:
    op.drop_column("label_tasks", "elapsed_ms")
