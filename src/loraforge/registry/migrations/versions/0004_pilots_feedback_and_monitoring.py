"""pilots, feedback, and what monitoring needs of each request

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pilots",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("route", sa.String(length=255), nullable=False),
        sa.Column("control", sa.String(length=255), nullable=False),
        sa.Column("adapter", sa.String(length=255), nullable=False),
        sa.Column("percent", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("ended_by", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["route"], ["routes.name"], name=op.f("fk_pilots_route_routes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pilots")),
    )
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.create_index("ix_pilots_route_ended_at", ["route", "ended_at"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("rating", sa.Integer(), nullable=False),
        sa.Column("scale", sa.String(length=8), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("request_id", name=op.f("uq_feedback_request_id")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feedback_tenant"), ["tenant"], unique=False)

    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("route", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("pilot_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("arm", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("user_hash", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("status", sa.Integer(), server_default="200", nullable=False))
        batch_op.add_column(sa.Column("latency_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("refusal", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("novelty", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("unfamiliar", sa.Boolean(), nullable=True))
        batch_op.create_index("ix_usage_records_model_ts", ["model", "ts"], unique=False)
        batch_op.create_index("ix_usage_records_pilot_id", ["pilot_id"], unique=False)
        batch_op.create_index("ix_usage_records_request_id", ["request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_records_request_id")
        batch_op.drop_index("ix_usage_records_pilot_id")
        batch_op.drop_index("ix_usage_records_model_ts")
        for column in (
            "unfamiliar",
            "novelty",
            "refusal",
            "latency_s",
            "status",
            "user_hash",
            "arm",
            "pilot_id",
            "route",
            "adapter",
        ):
            batch_op.drop_column(column)

    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_feedback_tenant"))
    op.drop_table("feedback")
    with op.batch_alter_table("pilots", schema=None) as batch_op:
        batch_op.drop_index("ix_pilots_route_ended_at")
    op.drop_table("pilots")
