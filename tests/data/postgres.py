"""A throwaway PostgreSQL server for the OMOP tests: Debian's postgresql, started and stopped here.

The server listens on a Unix socket only (no TCP port), in a fresh folder owned by the
``postgres`` system user when the tests run as root (PostgreSQL refuses to run as root), with
password (SCRAM) authentication so that the tests exercise real credentials. It is stopped and
its folder removed at teardown, whatever the tests did. Without PostgreSQL the tests that need
it skip, naming the package; with FEDMED_REQUIRE_POSTGRES=1 (CI, .ci/run) they fail instead.
"""

from __future__ import annotations

import glob
import io
import os
import random
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from fedmed.data.omop.schema import OPTIONAL_TABLES, columns_of, create_statements


def _bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@dataclass(frozen=True)
class Server:
    """A running server: its socket folder and port, and the superuser's password."""

    socket_dir: str
    port: int
    password: str

    def url(self, database: str, user: str = "postgres") -> str:
        """A password-free URL (the socket folder and port as query parameters)."""
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"

    def admin(self, database: str = "postgres"):  # -> psycopg.Connection
        import psycopg

        return psycopg.connect(
            host=self.socket_dir,
            port=self.port,
            user="postgres",
            password=self.password,
            dbname=database,
            autocommit=True,
        )

    def create_cdm(self, database: str, tables: dict[str, pd.DataFrame], schema: str) -> None:
        """A new database holding ``tables`` as CDM tables in ``schema`` (fedmed's DDL)."""
        from psycopg import sql

        with self.admin() as con:
            con.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        with self.admin(database) as con:
            con.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            con.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            optional = tuple(name for name in tables if name in OPTIONAL_TABLES)
            for statement in create_statements(optional):
                con.execute(statement)
            for name, frame in tables.items():
                columns = [c for c in columns_of(name) if c in frame.columns]
                text = io.StringIO()
                frame[columns].to_csv(
                    text, index=False, header=False, date_format="%Y-%m-%d %H:%M:%S"
                )
                copy = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
                    sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
                )
                with con.cursor().copy(copy) as pipe:
                    pipe.write(text.getvalue())

    def create_reader(self, user: str, password: str, databases: list[str], schema: str) -> None:
        """A login role that may read ``schema`` in each database, and nothing more."""
        from psycopg import sql

        with self.admin() as con:
            con.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(password)
                )
            )
        for database in databases:
            with self.admin(database) as con:
                con.execute(
                    sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                        sql.Identifier(schema), sql.Identifier(user)
                    )
                )
                con.execute(
                    sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                        sql.Identifier(schema), sql.Identifier(user)
                    )
                )


def start_server() -> Iterator[Server]:
    """Start a server for the duration of a fixture; skip (or fail in CI) without PostgreSQL."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        reason = "PostgreSQL server programs (initdb, pg_ctl) not found: apt-get install postgresql"
        if os.environ.get("FEDMED_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}; FEDMED_REQUIRE_POSTGRES=1 makes them required")
        pytest.skip(reason)
    pytest.importorskip("psycopg", reason="PostgreSQL access is the optional 'omop' extra")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="fedmed-pg-"))
    password = secrets.token_urlsafe(16)
    port = random.randint(20000, 60000)  # names the socket file only: no TCP listener
    data = root / "data"
    try:
        (root / "pw").write_text(password + "\n")
        if as_postgres:
            shutil.chown(root, "postgres")
            shutil.chown(root / "pw", "postgres")
        run = lambda *args: subprocess.run(  # noqa: E731
            [*as_postgres, *args], check=True, capture_output=True, text=True, timeout=120
        )
        run(initdb, "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
            f"--pwfile={root / 'pw'}", "-E", "UTF8", "--no-sync")  # fmt: skip
        options = f"-p {port} -k {root} -c listen_addresses='' -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.fail(f"could not start PostgreSQL: {detail.strip()[-500:]}")
    try:
        yield Server(str(root), port, password)
    finally:
        subprocess.run(
            [*as_postgres, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)
