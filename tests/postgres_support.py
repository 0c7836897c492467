"""A throwaway PostgreSQL server for the tests, from the machine's own binaries.

The server lives in a temp dir and listens on 127.0.0.1 on a free port; TCP connections
authenticate with a random password (scram-sha-256), as a production instance would. Without
the binaries the tests are skipped locally but fail in CI (`CI=true`), which must run them.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import pytest

from tests.conftest import free_port, skip_or_fail

OS_USER = "postgres"  # postgres refuses to run as root
DB_USER = "dagster"
DB_NAME = "dagster"
# A throwaway server: durability buys nothing here and costs seconds of fsync.
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    db_name: str
    password: str = field(repr=False)  # never in reprs, logs or assertion messages


def newest_bin_dir() -> Path | None:
    """The bin dir of the newest installed PostgreSQL major version that has initdb and pg_ctl."""
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name))

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(os.access(Path(candidate) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(candidate)
    return None


def as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary as a user it accepts."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        skip_or_fail("running as root and `runuser` is missing")
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        skip_or_fail(f"running as root and there is no `{OS_USER}` OS user to run PostgreSQL")
    return ["runuser", "-u", OS_USER, "--"]


def run(prefix: list[str], binary: Path, *args: str) -> None:
    done = subprocess.run([*prefix, str(binary), *args], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{binary.name} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


def init_cluster(bin_dir: Path, prefix: list[str], root: Path, password: str) -> Path:
    data_dir = root / "data"
    password_file = root / "pwfile"
    password_file.write_text(password)
    if prefix:
        shutil.chown(password_file, OS_USER)
    try:
        run(prefix, bin_dir / "initdb", "-D", str(data_dir), "-U", DB_USER, "--pwfile", str(password_file),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
    finally:
        password_file.unlink()
    return data_dir


def start_server(bin_dir: Path, prefix: list[str], root: Path, data_dir: Path, attempts: int = 3) -> int:
    """Starts the server on a free port; another process may take the port first, so retry."""
    options = " ".join(["-c listen_addresses=127.0.0.1", f"-k {root}", *(f"-c {s}" for s in FAST_SETTINGS)])
    for attempt in range(attempts):
        port = free_port()
        try:
            run(prefix, bin_dir / "pg_ctl", "start", "-D", str(data_dir), "-l", str(root / "server.log"),
                "-w", "-t", "30", "-o", f"-p {port} {options}")
            return port
        except RuntimeError:
            if attempt == attempts - 1:
                log = root / "server.log"
                raise RuntimeError(f"PostgreSQL did not start: {log.read_text()[-2000:] if log.exists() else ''}")
    raise AssertionError("unreachable")


def create_database(port: int, password: str) -> None:
    connection = psycopg2.connect(host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres")
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{DB_NAME}"')  # identifier from code, never from data
    finally:
        connection.close()


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running server with an empty database; stopped and deleted on exit."""
    bin_dir = newest_bin_dir()
    if bin_dir is None:
        skip_or_fail("no PostgreSQL binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin")
    prefix = as_server_user()
    root = Path(tempfile.mkdtemp(prefix="pg-test-"))  # short path: the unix socket lives here
    if prefix:
        shutil.chown(root, OS_USER, OS_USER)
    data_dir = None
    try:
        password = secrets.token_urlsafe(24)
        data_dir = init_cluster(bin_dir, prefix, root, password)
        port = start_server(bin_dir, prefix, root, data_dir)
        create_database(port, password)
        yield PostgresServer(host="127.0.0.1", port=port, user=DB_USER, db_name=DB_NAME, password=password)
    finally:
        if data_dir is not None and (data_dir / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "stop", "-D", str(data_dir), "-m", "fast", "-w"],
                           capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module", name="postgres")
def postgres_fixture() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server
