"""Alembic migrations of the store's schema (``server.store.schema``), for SQLite and PostgreSQL.

``env.py`` and ``versions/`` ship inside the package; :mod:`server.store.migrate` runs them
programmatically (no ``alembic.ini``). ``python -m server.store.migrate revision -m "..."``
writes a new revision from the difference between ``schema.py`` and the migrations.
"""
