"""${message}

Revision ${up_revision} (after ${down_revision | comma,n}): adds only, never drops data.
"""

import sqlalchemy as sa
from alembic import op

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    raise NotImplementedError("downgrades would drop rows: restore a backup instead")
