"""Persistence: the Store interface, its SQL implementation (SQLite and PostgreSQL), the schema and its migrations."""
