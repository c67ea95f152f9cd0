"""Shared fixtures: a PostgreSQL server for the storage tests that run against it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest

from tests.peers import Postgres, postgres

_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL server (Debian's, started on loopback in a temp dir) for the whole run."""
    with postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A fresh, empty database on the shared server."""
    name = f"sijnode_test_{next(_database_numbers)}"
    with psycopg.connect(postgres_server.conninfo, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
