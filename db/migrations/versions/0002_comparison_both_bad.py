"""Blind A/B votes may be "both_bad" (stored apart from "tie", counted in its own column).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "choice IN ('a', 'b', 'tie')"
NEW = "choice IN ('a', 'b', 'tie', 'both_bad')"


def upgrade() -> None:
    # batch mode: SQLite recreates the table (named CHECK constraints are reflected and carried over)
    with op.batch_alter_table('comparisons') as batch_op:
        batch_op.drop_constraint(op.f('ck_comparisons_choice'), type_='check')
        batch_op.create_check_constraint(op.f('ck_comparisons_choice'), NEW)


def downgrade() -> None:
    # the old schema knows no "both bad": such votes become ties (neither version won), as before
    op.execute("UPDATE comparisons SET choice = 'tie' WHERE choice = 'both_bad'")
    with op.batch_alter_table('comparisons') as batch_op:
        batch_op.drop_constraint(op.f('ck_comparisons_choice'), type_='check')
        batch_op.create_check_constraint(op.f('ck_comparisons_choice'), OLD)
