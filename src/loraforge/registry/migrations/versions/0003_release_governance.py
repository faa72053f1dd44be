"""release governance: lifecycle, approvals, routes and deployments, audit heads

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_transitions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("adapter", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=True),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("override", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_transitions")),
    )
    with op.batch_alter_table("adapter_transitions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapter_transitions_adapter"), ["adapter"], unique=False)

    op.create_table(
        "audit_heads",
        sa.Column("log", sa.String(length=255), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("log", name=op.f("pk_audit_heads")),
    )
    op.create_table(
        "release_policies",
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_release_policies")),
    )
    op.create_table(
        "routes",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name=op.f("fk_routes_tenant_tenants")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_routes")),
    )
    with op.batch_alter_table("routes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_routes_tenant"), ["tenant"], unique=False)

    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("route", sa.String(length=255), nullable=False),
        sa.Column("adapter", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("previous_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["route"], ["routes.name"], name=op.f("fk_deployments_route_routes")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deployments")),
    )
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_index("ix_deployments_route_ended_at", ["route", "ended_at"], unique=False)

    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("state", sa.String(length=16), server_default="draft", nullable=False))
        batch_op.add_column(sa.Column("created_by", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("release_override", sa.Text(), nullable=True))
    # adapters with a recorded evaluation have reached the second state of the lifecycle
    op.execute("UPDATE adapters SET state = 'evaluated' WHERE name IN (SELECT adapter FROM evaluations)")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch_op.add_column(
            sa.Column("environment", sa.String(length=16), server_default="development", nullable=False)
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_by", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("created_by")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("environment")
        batch_op.drop_column("owner")

    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_column("release_override")
        batch_op.drop_column("created_by")
        batch_op.drop_column("state")

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_index("ix_deployments_route_ended_at")

    op.drop_table("deployments")
    with op.batch_alter_table("routes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_routes_tenant"))

    op.drop_table("routes")
    op.drop_table("release_policies")
    op.drop_table("audit_heads")
    with op.batch_alter_table("adapter_transitions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapter_transitions_adapter"))

    op.drop_table("adapter_transitions")
