"""home migrations record each imported file and its hash

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("home_migrations", schema=None) as batch_op:
        batch_op.alter_column(
            "source", existing_type=sa.String(length=64), type_=sa.String(length=255), existing_nullable=False
        )
        batch_op.add_column(sa.Column("sha256", sa.String(length=64), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("home_migrations", schema=None) as batch_op:
        batch_op.drop_column("sha256")
        batch_op.alter_column(
            "source", existing_type=sa.String(length=255), type_=sa.String(length=64), existing_nullable=False
        )
