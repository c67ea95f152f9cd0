"""result versions per chain, input fingerprints, and the kind of each received object

Revision ID: 0002_i9
Revises: 0001
"""

from alembic import op
import sqlalchemy as sa


revision = '0002_i9'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances') as batch:
        batch.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='input'))
        batch.add_column(sa.Column('digest', sa.String(length=64), nullable=True))
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('result_version', sa.Integer(), nullable=False, server_default='1'))
        batch.add_column(sa.Column('input_fingerprint', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('input_fingerprint')
        batch.drop_column('result_version')
    with op.batch_alter_table('instances') as batch:
        batch.drop_column('digest')
        batch.drop_column('kind')
