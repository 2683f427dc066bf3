"""A throwaway PostgreSQL cluster for the feedback tests: initdb in a temp dir, a unix socket only.

conftest.py loads this as a plugin (`pg_cluster`, one per session; `db_url`); nothing is mocked.
As root, the server runs as the `postgres` OS user (created if missing), as PostgreSQL requires.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_USER = "postgres"


def pg_bin(name: str) -> str:
    """The newest /usr/lib/postgresql/*/bin/NAME, else NAME on PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    path = found[-1] if found else shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: apt-get install postgresql (make install does)")
    return path


def _version_key(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
    return ["runuser", "-u", PG_USER, "--", *argv]


@dataclass
class Cluster:
    root: Path  # data dir and socket dir live under it

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str, schema: str | None = None) -> str:
        url = f"postgresql+psycopg://{PG_USER}@/{database}?host={self.socket_dir}"
        return url + (f"&options=-csearch_path%3D{schema}" if schema else "")

    def psql(self, sql: str, database: str = "postgres") -> str:
        out = subprocess.run(
            [pg_bin("psql"), "-h", str(self.socket_dir), "-U", PG_USER, "-d", database],
            input=sql,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return out.stdout

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE DATABASE {name};")
        return name

    def create_schema(self) -> str:
        """A fresh schema in the `postgres` database: far cheaper than a database per test."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.psql(f"CREATE SCHEMA {name};")
        return name


def start_cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="tfpg-"))  # short: a socket path has ~100 characters
    (root / "sock").mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
        shutil.chown(root / "sock", PG_USER)
        os.chmod(root, 0o755)
    data = root / "data"
    subprocess.run(
        _as_server_user(
            [pg_bin("initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-k {root / 'sock'} -c listen_addresses='' -c fsync=on -c max_connections=60"
    subprocess.run(
        _as_server_user(
            [
                pg_bin("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "-o",
                options,
                "start",
            ]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    return Cluster(root)


def stop_cluster(cluster: Cluster) -> None:
    subprocess.run(
        _as_server_user(
            [pg_bin("pg_ctl"), "-D", str(cluster.root / "data"), "-m", "immediate", "stop"]
        ),
        capture_output=True,
        timeout=120,
    )
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = start_cluster()
    yield cluster
    stop_cluster(cluster)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty store: an SQLite file, or a new schema in the throwaway cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    return cluster.url("postgres", cluster.create_schema())
