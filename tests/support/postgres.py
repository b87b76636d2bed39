"""The real PostgreSQL server the tests use (127.0.0.1:5432, or SPLITINFER_TEST_POSTGRES_URL: a superuser URL on
its maintenance database): a scratch database per test, dropped afterwards; the skip mark when none answers."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

POSTGRES_ADMIN_URL = os.environ.get("SPLITINFER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_answers(url: str = POSTGRES_ADMIN_URL) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2):
            return True
    except OSError:
        return False


POSTGRES_UP = postgres_answers()
requires_postgres = pytest.mark.skipif(not POSTGRES_UP, reason=f"no PostgreSQL at {POSTGRES_ADMIN_URL}")


@contextlib.contextmanager
def scratch_database(tag: str = "t"):
    """The URL of a database of the test's own (created now, dropped at the end, its connections closed)."""
    import psycopg

    name = f"splitinfer_{tag}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(POSTGRES_ADMIN_URL)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
