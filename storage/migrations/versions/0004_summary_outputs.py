"""outputs.job_id nullable: the summary of a study no chain ran on belongs to the study, not a job

Revision ID: 0004_summary
Revises: 0003_i17
"""

from alembic import op
import sqlalchemy as sa


revision = '0004_summary'
down_revision = '0003_i17'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.alter_column('job_id', existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    # study-level outputs have no job to keep them under: they go, with their deliveries
    op.execute("DELETE FROM deliveries WHERE output_uid IN (SELECT sop_instance_uid FROM outputs WHERE job_id IS NULL)")
    op.execute("DELETE FROM outputs WHERE job_id IS NULL")
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.alter_column('job_id', existing_type=sa.Integer(), nullable=False)
