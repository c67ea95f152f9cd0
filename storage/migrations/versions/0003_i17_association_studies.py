"""association_studies: which associations delivered which study, for completion on release

Revision ID: 0003_i17
Revises: 0002_i9
"""

from alembic import op
import sqlalchemy as sa


revision = '0003_i17'
down_revision = '0002_i9'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('association_studies',
    sa.Column('association', sa.String(length=128), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('owner', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('opened_at', sa.DateTime(), nullable=False),
    sa.Column('ended_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('association', 'study_uid')
    )
    op.create_index(op.f('ix_association_studies_study_uid'), 'association_studies', ['study_uid'], unique=False)
    op.create_index(op.f('ix_association_studies_owner'), 'association_studies', ['owner'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_association_studies_owner'), table_name='association_studies')
    op.drop_index(op.f('ix_association_studies_study_uid'), table_name='association_studies')
    op.drop_table('association_studies')
