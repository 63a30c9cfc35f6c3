"""Initial schema: every table of the feedback store.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 06:57:09.508872
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

#: Timestamps are stored timezone-aware (PostgreSQL timestamptz; naive UTC in SQLite).
TS = sa.DateTime(timezone=True)


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=255), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('sha256', name=op.f('uq_images_sha256'))
    )
    op.create_table('model_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('path', sa.String(length=1024), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('promoted_at', TS, nullable=True),
    sa.CheckConstraint("kind IN ('editor', 'reward')", name=op.f('ck_model_versions_kind')),
    sa.CheckConstraint("status IN ('candidate', 'promoted', 'retired')", name=op.f('ck_model_versions_status')),
    sa.ForeignKeyConstraint(['parent_id'], ['model_versions.id'], name=op.f('fk_model_versions_parent_id_model_versions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_versions')),
    sa.UniqueConstraint('kind', 'name', name=op.f('uq_model_versions_kind_name'))
    )
    op.create_index(op.f('ix_model_versions_kind_status'), 'model_versions', ['kind', 'status'], unique=False)
    if op.get_bind().dialect.name in ('sqlite', 'postgresql'):
        op.create_index(
            'uq_model_versions_one_promoted',
            'model_versions',
            ['kind'],
            unique=True,
            sqlite_where=sa.text("status = 'promoted'"),
            postgresql_where=sa.text("status = 'promoted'"),
        )

    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=True),
    sa.Column('is_simulated', sa.Boolean(), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.CheckConstraint("role IN ('visitor', 'annotator', 'admin')", name=op.f('ck_users_role')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('comparisons',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('voter_id', sa.Integer(), nullable=False),
    sa.Column('version_a_id', sa.Integer(), nullable=False),
    sa.Column('version_b_id', sa.Integer(), nullable=False),
    sa.Column('instruction', sa.Text(), nullable=False),
    sa.Column('source_image_id', sa.Integer(), nullable=True),
    sa.Column('image_a_id', sa.Integer(), nullable=True),
    sa.Column('image_b_id', sa.Integer(), nullable=True),
    sa.Column('a_shown_left', sa.Boolean(), nullable=False),
    sa.Column('choice', sa.String(length=8), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('submission_key', sa.String(length=64), nullable=True),
    sa.Column('created_at', TS, nullable=False),
    sa.CheckConstraint("choice IN ('a', 'b', 'tie')", name=op.f('ck_comparisons_choice')),
    sa.CheckConstraint('seconds IS NULL OR seconds >= 0', name=op.f('ck_comparisons_seconds')),
    sa.CheckConstraint('version_a_id <> version_b_id', name=op.f('ck_comparisons_distinct_versions')),
    sa.ForeignKeyConstraint(['image_a_id'], ['images.id'], name=op.f('fk_comparisons_image_a_id_images')),
    sa.ForeignKeyConstraint(['image_b_id'], ['images.id'], name=op.f('fk_comparisons_image_b_id_images')),
    sa.ForeignKeyConstraint(['source_image_id'], ['images.id'], name=op.f('fk_comparisons_source_image_id_images')),
    sa.ForeignKeyConstraint(['version_a_id'], ['model_versions.id'], name=op.f('fk_comparisons_version_a_id_model_versions')),
    sa.ForeignKeyConstraint(['version_b_id'], ['model_versions.id'], name=op.f('fk_comparisons_version_b_id_model_versions')),
    sa.ForeignKeyConstraint(['voter_id'], ['users.id'], name=op.f('fk_comparisons_voter_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_comparisons')),
    sa.UniqueConstraint('voter_id', 'submission_key', name=op.f('uq_comparisons_voter_id_submission_key'))
    )
    op.create_index(op.f('ix_comparisons_versions'), 'comparisons', ['version_a_id', 'version_b_id'], unique=False)

    op.create_table('edit_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('source_image_id', sa.Integer(), nullable=False),
    sa.Column('instruction', sa.Text(), nullable=False),
    sa.Column('model_version_id', sa.Integer(), nullable=True),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('consent_training', sa.Boolean(), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.ForeignKeyConstraint(['model_version_id'], ['model_versions.id'], name=op.f('fk_edit_requests_model_version_id_model_versions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['source_image_id'], ['images.id'], name=op.f('fk_edit_requests_source_image_id_images')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_edit_requests_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_edit_requests'))
    )
    op.create_index(op.f('ix_edit_requests_created_at'), 'edit_requests', ['created_at'], unique=False)
    op.create_index(op.f('ix_edit_requests_model_version_id'), 'edit_requests', ['model_version_id'], unique=False)
    op.create_index(op.f('ix_edit_requests_source_image_id'), 'edit_requests', ['source_image_id'], unique=False)
    op.create_index(op.f('ix_edit_requests_user_id'), 'edit_requests', ['user_id'], unique=False)

    op.create_table('training_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', TS, nullable=False),
    sa.Column('started_at', TS, nullable=True),
    sa.Column('finished_at', TS, nullable=True),
    sa.Column('log_path', sa.String(length=1024), nullable=True),
    sa.Column('base_version_id', sa.Integer(), nullable=True),
    sa.Column('produced_version_id', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_training_runs_status')),
    sa.ForeignKeyConstraint(['base_version_id'], ['model_versions.id'], name=op.f('fk_training_runs_base_version_id_model_versions'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['produced_version_id'], ['model_versions.id'], name=op.f('fk_training_runs_produced_version_id_model_versions'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_runs'))
    )
    op.create_index(op.f('ix_training_runs_status'), 'training_runs', ['status'], unique=False)

    op.create_table('rankings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.Integer(), nullable=False),
    sa.Column('annotator_id', sa.Integer(), nullable=False),
    sa.Column('top_k', sa.Integer(), nullable=True),
    sa.Column('all_bad', sa.Boolean(), nullable=False),
    sa.Column('skip', sa.Boolean(), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.Column('submission_key', sa.String(length=64), nullable=True),
    sa.Column('created_at', TS, nullable=False),
    sa.CheckConstraint('seconds IS NULL OR seconds >= 0', name=op.f('ck_rankings_seconds')),
    sa.CheckConstraint('top_k IS NULL OR top_k >= 1', name=op.f('ck_rankings_top_k')),
    sa.ForeignKeyConstraint(['annotator_id'], ['users.id'], name=op.f('fk_rankings_annotator_id_users')),
    sa.ForeignKeyConstraint(['request_id'], ['edit_requests.id'], name=op.f('fk_rankings_request_id_edit_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_rankings')),
    sa.UniqueConstraint('annotator_id', 'submission_key', name=op.f('uq_rankings_annotator_id_submission_key')),
    sa.UniqueConstraint('request_id', 'annotator_id', name=op.f('uq_rankings_request_id_annotator_id'))
    )
    op.create_index(op.f('ix_rankings_annotator_id_created_at'), 'rankings', ['annotator_id', 'created_at'], unique=False)

    op.create_table('variants',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('request_id', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.CheckConstraint('position >= 0', name=op.f('ck_variants_position')),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_variants_image_id_images')),
    sa.ForeignKeyConstraint(['request_id'], ['edit_requests.id'], name=op.f('fk_variants_request_id_edit_requests'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_variants')),
    sa.UniqueConstraint('request_id', 'position', name=op.f('uq_variants_request_id_position'))
    )
    op.create_index(op.f('ix_variants_image_id'), 'variants', ['image_id'], unique=False)

    op.create_table('ranking_items',
    sa.Column('ranking_id', sa.Integer(), nullable=False),
    sa.Column('variant_id', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('instruction_following', sa.Integer(), nullable=True),
    sa.Column('preservation', sa.Integer(), nullable=True),
    sa.Column('quality', sa.Integer(), nullable=True),
    sa.CheckConstraint('instruction_following IS NULL OR (instruction_following >= 1 AND instruction_following <= 5)', name=op.f('ck_ranking_items_instruction_following')),
    sa.CheckConstraint('preservation IS NULL OR (preservation >= 1 AND preservation <= 5)', name=op.f('ck_ranking_items_preservation')),
    sa.CheckConstraint('quality IS NULL OR (quality >= 1 AND quality <= 5)', name=op.f('ck_ranking_items_quality')),
    sa.CheckConstraint('rank IS NULL OR rank >= 1', name=op.f('ck_ranking_items_rank')),
    sa.ForeignKeyConstraint(['ranking_id'], ['rankings.id'], name=op.f('fk_ranking_items_ranking_id_rankings'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['variant_id'], ['variants.id'], name=op.f('fk_ranking_items_variant_id_variants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('ranking_id', 'variant_id', name=op.f('pk_ranking_items'))
    )
    op.create_index(op.f('ix_ranking_items_variant_id'), 'ranking_items', ['variant_id'], unique=False)



def downgrade() -> None:
    op.drop_table('ranking_items')
    op.drop_table('variants')
    op.drop_table('rankings')
    op.drop_table('training_runs')
    op.drop_table('edit_requests')
    op.drop_table('comparisons')
    op.drop_table('users')
    op.drop_table('model_versions')
    op.drop_table('images')
