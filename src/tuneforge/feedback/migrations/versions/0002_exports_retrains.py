"""Lineage: exported datasets and retrain runs, and where each feedback row came from.

Revision 0002 (after 0001): two new tables and two defaulted columns on `feedback`; no row moves.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("source", sa.String(16), nullable=False, server_default="api"))
        batch.add_column(
            sa.Column("payload_sha256", sa.String(64), nullable=False, server_default="")
        )
    op.create_table(
        "exported_datasets",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("feedback_ids", sa.Text, nullable=False),
        sa.Column("filters", sa.Text, nullable=False),
    )
    op.create_table(
        "retrain_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("finished", sa.Float, nullable=True),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("retrain_runs.id"), nullable=True),
        sa.Column("parent_path", sa.Text, nullable=False),
        sa.Column("candidate_path", sa.Text, nullable=True),
        sa.Column("objective", sa.String(8), nullable=False),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("exported_datasets.id"), nullable=True),
        sa.Column("data_hashes", sa.Text, nullable=False),
        sa.Column("feedback_ids", sa.Text, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("downgrades would drop rows: restore a backup instead")
