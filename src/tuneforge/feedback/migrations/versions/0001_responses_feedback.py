"""The first schema: served responses (from the serve records) and the feedback on them.

Revision 0001 (the base): tables `responses` and `feedback`; later revisions only add to them.
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(80), primary_key=True),
        sa.Column("created", sa.Float, nullable=False, index=True),
        sa.Column("route", sa.String(80), nullable=False),
        sa.Column("model", sa.String(300), nullable=False),
        sa.Column("adapter", sa.String(300), nullable=True),
        sa.Column("request", sa.Text, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("completion", sa.Text, nullable=False),
        sa.Column("finish_reason", sa.String(40), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_s", sa.Float, nullable=False),
        sa.Column("ttft_s", sa.Float, nullable=True),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "response_id", sa.String(80), sa.ForeignKey("responses.id"), nullable=False, index=True
        ),
        sa.Column("created", sa.Float, nullable=False, index=True),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("scale", sa.String(10), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("comment", sa.Text, nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
    )


def downgrade() -> None:
    raise NotImplementedError("downgrades would drop rows: restore a backup instead")
