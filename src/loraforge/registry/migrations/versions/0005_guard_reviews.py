"""the review queue of guard blocks and flags

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guard_reviews",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("check", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Integer(), nullable=False),
        sa.Column("excerpt", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decision", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.String(length=255), nullable=True),
        sa.Column("resolved_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_guard_reviews")),
    )
    with op.batch_alter_table("guard_reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_guard_reviews_request_id"), ["request_id"], unique=False)
        batch_op.create_index("ix_guard_reviews_tenant_status", ["tenant", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("guard_reviews", schema=None) as batch_op:
        batch_op.drop_index("ix_guard_reviews_tenant_status")
        batch_op.drop_index(batch_op.f("ix_guard_reviews_request_id"))
    op.drop_table("guard_reviews")
