"""Persistence: SQLModel tables, the database handle (SQLite or PostgreSQL), migrations, the
hash-chained audit log and the redactor that keeps secrets out of every stored value.

Import rules (enforced by `tests/test_layout.py`): `storage` imports only `storage.*`, the standard
library and third-party libraries; never `bot` nor `tools`.
"""
