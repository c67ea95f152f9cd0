"""The database (SQLAlchemy models, sessions, Alembic migrations) and the spool."""
