"""Iceberg tables through pyiceberg: table storage that many processes and machines share.

    lakehouse.write_day("outputs.recommendations", day, arrow_table, fingerprint)  -> Written
    lakehouse.day_fingerprint("outputs.recommendations", day)                       -> str | None
    lakehouse.read_day("outputs.recommendations", day)                              -> pa.Table
    lakehouse.read_through("raw.products", day)                                     -> pa.RecordBatchReader

A table that several writers share per day (ops.schema_errors: one source each) is written per
(day, keys): `write_day(..., keys={"source": "customers"})` replaces only the day's rows with those
values, and its marker is the property `fingerprint.<day>.source=customers`.

Catalog: `catalog_uri` (SQLAlchemy URL) makes a pyiceberg SQL catalog, PostgreSQL in tests and
in a small production; a REST catalog (`rest_uri`) is what a managed lakehouse offers (Polaris,
Nessie, Glue's REST endpoint, Databricks Unity). Data files go to `location`: a local path, or
`s3://bucket/prefix` with the `s3.*` options in `storage_options`.

A day is written as one idempotent partition overwrite: a single Iceberg commit deletes the day's
rows, adds the new files and sets the table property `fingerprint.<day>`, the commit marker.
Readers see the day's rows and its fingerprint together or not at all, and a write whose
fingerprint is already stored is skipped. No lock is taken: writers of other days race only on
the catalog's pointer swap, and a writer that loses it reloads the table and commits again
(`commit_attempts`), which is safe because each writer replaces only its own day. A commit whose
outcome is unknown (a REST catalog's 503/504) is settled the same way: after a reload the day's
marker says whether it landed, so it is committed again only if it did not.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import random
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

_CATALOGS: dict[tuple, Any] = {}  # catalog clients by process and settings (Lakehouse.catalog)
_CATALOGS_LOCK = threading.Lock()

PARTITION_COLUMN = "partition_day"
Where = dict[str, Any] | None  # column -> a value, or the values it may hold
FINGERPRINT_PROPERTY = "fingerprint."  # + the day: the commit marker of that day's last write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    table: str
    day: str
    rows: int
    skipped: bool  # the same fingerprint was stored: nothing was written
    attempts: int  # commits tried (more than one: another writer won the race first)


class Lakehouse(dg.ConfigurableResource):
    """Iceberg tables (pyiceberg) on a SQL or REST catalog, data on a path or S3."""

    catalog_name: str = Field(default="pipeline", description="Catalog name (a label for pyiceberg).")
    catalog_uri: str | None = Field(
        default=None, repr=False, description="SQL catalog: a SQLAlchemy URL (postgresql+psycopg2://...); may hold a "
                                              "password, so pass it through dg.EnvVar.")
    rest_uri: str | None = Field(default=None, description="REST catalog endpoint, instead of catalog_uri.")
    rest_token: str | None = Field(default=None, repr=False,
                                   description="REST catalog: a bearer token (pass it through dg.EnvVar).")
    location: str = Field(description="Where data files go: a path or s3://bucket/prefix.")
    # repr=False: s3.secret-access-key lives here (pass it through dg.EnvVar).
    storage_options: dict[str, str] = Field(default_factory=dict, repr=False,
                                            description="pyiceberg FileIO options (s3.endpoint, s3.access-key-id, ...).")
    commit_attempts: int = Field(default=8, ge=1, description="Commits tried when other writers win the race.")
    history_grace_minutes: float = Field(
        default=60, ge=0, description="Snapshots replaced less than this long ago keep their files when the history "
                                      "is expired (retention jobs): readers may still be scanning them.")

    def catalog(self):
        """The catalog client, one a process for the same settings (a SQL catalog's engine and its
        connection pool, a REST catalog's session): every table write asks for it several times."""
        key = (os.getpid(), self.catalog_name, self.catalog_uri, self.rest_uri, self.rest_token, self.location,
               tuple(sorted(self.storage_options.items())))
        with _CATALOGS_LOCK:
            if key not in _CATALOGS:
                _CATALOGS[key] = self._new_catalog()
            return _CATALOGS[key]

    def _new_catalog(self):
        from pyiceberg.catalog import load_catalog

        location = self.location if "://" in self.location else Path(self.location).resolve().as_uri()
        options: dict[str, Any] = {"warehouse": location, **self.storage_options}
        if self.rest_uri:
            options.update(type="rest", uri=self.rest_uri, **({"token": self.rest_token} if self.rest_token else {}))
        elif self.catalog_uri:
            options.update(type="sql", uri=self.catalog_uri)
        else:
            raise ValueError("Lakehouse needs catalog_uri (SQL catalog) or rest_uri (REST catalog)")
        if options["type"] == "rest":
            return load_catalog(self.catalog_name, **options)
        from sqlalchemy.exc import DBAPIError

        for attempt in range(1, 4):
            try:
                return load_catalog(self.catalog_name, **options)
            except DBAPIError:
                # a new SQL catalog creates its tables if missing (check, then create): writers that
                # start at once on a fresh database race there (seen with ten); the loser finds them
                if attempt == 3:
                    raise
                time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    def write_day(self, table: str, day: str | dt.date, data: pa.Table | Callable[[], Iterable[pa.Table]],
                  fingerprint: str, schema: pa.Schema | None = None, keys: dict[str, str] | None = None) -> Written:
        """Replace `day` of `table` with `data` in one commit, unless `fingerprint` is stored.

        `data` is a table, or a callable giving the rows as a stream of tables (then `schema` is
        needed): each becomes its own data files, all committed at once, so memory holds one.
        `keys`: replace only the day's rows with these column values (the data holds only those)."""
        if isinstance(data, pa.Table):
            chunks, schema = (lambda: [data]), schema or data.schema
        elif schema is None:
            raise ValueError("write_day: a stream of tables needs its schema")
        else:
            chunks = data
        schema = _day_schema(schema)

        def append(tx, counted: list[int]) -> None:
            for chunk in chunks():
                if chunk.num_rows:
                    tx.append(_with_day(chunk, str(day)).cast(schema))
                    counted[0] += chunk.num_rows

        return self._replace_day(table, str(day), schema, fingerprint, keys, append)

    def write_day_files(self, table: str, day: str | dt.date, write: Callable[[Path], int], fingerprint: str,
                        schema: pa.Schema, keys: dict[str, str] | None = None) -> Written:
        """write_day for rows another engine writes as Parquet: `write(folder)` writes the day's
        rows (with the partition column, the table's schema) as .parquet files into a new folder
        under the table's data and returns how many; the files are then added in the one commit.
        Local locations only (writes_local_files); the folder goes if no commit takes it."""
        schema, day = _day_schema(schema), str(day)
        if self.day_fingerprint(table, day, keys) == fingerprint:
            return Written(table, day, 0, True, 0)
        folder = self.local_data_folder(table, schema) / f"{PARTITION_COLUMN}={day}" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            rows = write(folder)
            files = sorted(str(f) for f in folder.glob("*.parquet"))

            def add(tx, counted: list[int]) -> None:
                if files:
                    tx.add_files(files)
                counted[0] = rows

            written = self._replace_day(table, day, schema, fingerprint, keys, add)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if written.skipped:  # another writer stored the same fingerprint first
            shutil.rmtree(folder, ignore_errors=True)
        return written

    def drop_day(self, table: str, day: str | dt.date, keys: dict[str, str] | None = None) -> None:
        """Delete `day`'s rows (with `keys`' values) and forget its marker, in one commit: a later
        write of the same fingerprint writes again instead of skipping. The files go when the
        history is expired (expire_history)."""
        day = str(day)
        if not self.catalog().table_exists(table):
            return

        def drop(iceberg, tx) -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Delete operation did not match any records")  # nothing to drop
                tx.delete(_day_rows(day, keys))
            if _marker(day, keys) in iceberg.properties:
                tx.remove_properties(_marker(day, keys))

        self._commit_again_if_raced(table, drop)

    def _commit_again_if_raced(self, table: str, change: Callable[[Any, Any], Any]) -> Any:
        """`change(table, transaction)` committed; when another writer won the race, the table is
        reloaded and the change made and committed again (`commit_attempts`). Returns its result."""
        from pyiceberg.exceptions import CommitFailedException

        for attempt in range(1, self.commit_attempts + 1):
            iceberg = self.catalog().load_table(table)
            try:
                with iceberg.transaction() as tx:
                    result = change(iceberg, tx)
                return result
            except CommitFailedException:
                if attempt == self.commit_attempts:
                    raise
                time.sleep(random.uniform(0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    def put_file(self, key: str, source: Path) -> None:
        """A build's file (a fitted model) kept under `<location>/files/<key>`, beside the tables."""
        with self._file_io().new_output(self._file_location(key)).create(overwrite=True) as out, source.open("rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)

    def get_file(self, key: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._file_io().new_input(self._file_location(key)).open() as f, target.open("wb") as out:
            shutil.copyfileobj(f, out, 1 << 20)

    def has_file(self, key: str) -> bool:
        return self._file_io().new_input(self._file_location(key)).exists()

    def delete_file(self, key: str) -> None:
        self._file_io().delete(self._file_location(key))

    def _file_io(self):
        from pyiceberg.io import load_file_io

        return load_file_io(dict(self.storage_options), self._file_location(""))

    def _file_location(self, key: str) -> str:
        location = self.location if "://" in self.location else Path(self.location).resolve().as_uri()
        return f"{location.rstrip('/')}/files/{key}"

    @property
    def writes_local_files(self) -> bool:
        """Whether data files go to a local path (not S3): another engine can write them there."""
        return "://" not in self.location or self.location.startswith("file:")

    def local_data_folder(self, table: str, schema: pa.Schema) -> Path:
        """The local folder of a table's data files (the table created with `schema` if missing)."""
        if not self.writes_local_files:
            raise ValueError(f"{table}: data files go to {self.location}, not a local path")
        iceberg = _table_for(self.catalog(), table, _day_schema(schema))
        return Path(unquote(urlparse(iceberg.location()).path)) / "data"

    def _replace_day(self, table: str, day: str, schema: pa.Schema, fingerprint: str, keys: dict[str, str] | None,
                     add: Callable[[Any, list[int]], None]) -> Written:
        """One transaction, committed again when another writer won the race: the day's rows (with
        `keys`' values) deleted, `add(tx, counted)` adding the new ones, the marker set."""
        from pyiceberg.exceptions import CommitFailedException, CommitStateUnknownException, ServiceUnavailableError

        marker = _marker(day, keys)
        catalog = self.catalog()
        iceberg = _table_for(catalog, table, schema)
        unconfirmed = None  # rows of a commit whose answer was lost (it may have landed)
        for attempt in range(1, self.commit_attempts + 1):
            if iceberg.properties.get(marker) == fingerprint:
                # the marker is stored: by an earlier write (a skip), or by our unconfirmed commit
                return Written(table, day, unconfirmed or 0, unconfirmed is None, attempt - 1)
            counted = [0]
            try:
                with iceberg.transaction() as tx:
                    tx.delete(_day_rows(day, keys))
                    add(tx, counted)
                    tx.set_properties({marker: fingerprint})
                return Written(table, day, counted[0], False, attempt)
            except (CommitFailedException, CommitStateUnknownException, ServiceUnavailableError) as exc:
                # lost the race, or a REST catalog's commit whose outcome is unknown (5xx): reload
                # and look for the marker; the overwrite of our own day is safe to commit again
                if attempt == self.commit_attempts:
                    raise
                if not isinstance(exc, CommitFailedException):
                    unconfirmed = counted[0]
                    log.warning(f"{table} {day}: commit answered {type(exc).__name__}; reloading to see whether it landed")
                time.sleep(random.uniform(0, 0.05 * 2 ** attempt))  # the others commit meanwhile
                iceberg = catalog.load_table(table)
        raise AssertionError("unreachable")

    def day_fingerprint(self, table: str, day: str | dt.date, keys: dict[str, str] | None = None) -> str | None:
        catalog = self.catalog()
        if not catalog.table_exists(table):
            return None
        return catalog.load_table(table).properties.get(_marker(day, keys))

    def read_day(self, table: str, day: str | dt.date, where: Where = None, columns: tuple[str, ...] = ("*",)
                 ) -> pa.Table:
        """The day's rows (`where`: those with these column values; `columns`: only these)."""
        scan = self.catalog().load_table(table).scan(row_filter=_days(day, True, where), selected_fields=columns)
        return scan.to_arrow()

    def read_through(self, table: str, day: str | dt.date, day_only: bool = False, where: Where = None,
                     columns: tuple[str, ...] = ("*",)) -> pa.RecordBatchReader | None:
        """Every row of the days up to `day` (`day_only`: of that day; `where`: with these column
        values; `columns`: only these), streamed in batches (None: no such table yet)."""
        catalog = self.catalog()
        if not catalog.table_exists(table):
            return None
        scan = catalog.load_table(table).scan(row_filter=_days(day, day_only, where), selected_fields=columns)
        return scan.to_arrow_batch_reader()

    def local_files_through(self, table: str, day: str | dt.date, day_only: bool = False) -> list[str] | None:
        """The local Parquet data files that hold the days up to `day`, as a scan plans them (one
        day a file: the table is partitioned by day), for a reader that scans Parquet itself
        (DuckDB: its own memory limit, no Arrow copy). None when that would be wrong or cannot
        be done: no such table, delete files to apply, files not on a local path. Then use
        read_through."""
        catalog = self.catalog()
        if not catalog.table_exists(table):
            return None
        tasks = list(catalog.load_table(table).scan(row_filter=_days(day, day_only)).plan_files())
        paths = [task.file.file_path for task in tasks]
        if any(task.delete_files for task in tasks) or not all(p.startswith("file:") or "://" not in p for p in paths):
            return None
        return [unquote(urlparse(p).path) if p.startswith("file:") else p for p in paths]

    def blank_old_values(self, table: str, columns: tuple[str, ...], time_column: str, older_than: dt.datetime
                         ) -> int:
        """A retention: null `columns` in the rows whose `time_column` is before `older_than`.

        Each day holding such rows is rewritten in a commit of its own (memory holds one day; again
        after a reload when another writer won the race; the day's markers stay), then the history
        still holding the old values goes (`expire_history`). Returns how many rows were blanked."""
        from pyiceberg.expressions import And, LessThan, NotNull, Or

        catalog = self.catalog()
        if not catalog.table_exists(table):
            return 0
        held = [NotNull(column) for column in columns]
        stale = And(LessThan(time_column, older_than.isoformat()), held[0] if len(held) == 1 else Or(*held))
        days = catalog.load_table(table).scan(row_filter=stale, selected_fields=(PARTITION_COLUMN,)).to_arrow()
        blanked = sum(self._blank_day(table, day, columns, time_column, older_than)
                      for day in sorted(set(days[PARTITION_COLUMN].to_pylist())))
        self.expire_history(table)
        return blanked

    def _blank_day(self, table: str, day: str, columns: tuple[str, ...], time_column: str,
                   older_than: dt.datetime) -> int:
        from pyiceberg.expressions import EqualTo

        def blank(iceberg, tx) -> int:
            rows = iceberg.scan(row_filter=EqualTo(PARTITION_COLUMN, day)).to_arrow()
            old = pc.fill_null(pc.less(rows[time_column], pa.scalar(older_than, rows.schema.field(time_column).type)),
                               False)
            held = functools.reduce(pc.or_, [pc.is_valid(rows[column]) for column in columns])
            count = pc.sum(pc.and_(old, held)).as_py() or 0
            if count:  # else nothing to commit: the transaction stays empty
                for column in columns:
                    index = rows.schema.get_field_index(column)
                    rows = rows.set_column(index, rows.schema.field(index),
                                           pc.if_else(old, pa.nulls(1, rows[column].type)[0], rows[column]))
                tx.delete(EqualTo(PARTITION_COLUMN, day))
                tx.append(rows)
            return count

        return self._commit_again_if_raced(table, blank)

    def partition_days(self, table: str) -> list[str]:
        """The days the table holds rows of (from its manifests, not its data files)."""
        catalog = self.catalog()
        if not catalog.table_exists(table):
            return []
        partitions = catalog.load_table(table).inspect.partitions()["partition"].to_pylist()
        return sorted({partition[PARTITION_COLUMN] for partition in partitions})

    def table_names(self) -> list[str]:
        """Every table of the catalog, as namespace.name."""
        catalog = self.catalog()
        return sorted(".".join(identifier) for namespace in catalog.list_namespaces()
                      for identifier in catalog.list_tables(namespace))

    def expire_history(self, table: str) -> int:
        """Expire the snapshots that no branch or tag points at and that a later commit replaced
        more than `history_grace_minutes` ago (a reader may still be scanning a snapshot replaced
        just now), and delete the files (data, manifests, manifest lists) that only they
        referenced: values a later commit replaced are then gone from storage too. Returns how
        many files were deleted."""
        catalog = self.catalog()
        if not catalog.table_exists(table):
            return 0
        iceberg = catalog.load_table(table)
        heads = {ref.snapshot_id for ref in iceberg.metadata.refs.values()}
        replaced_at = {}  # snapshot -> when its first child was committed
        for snapshot in iceberg.snapshots():
            if snapshot.parent_snapshot_id is not None:
                replaced_at[snapshot.parent_snapshot_id] = min(snapshot.timestamp_ms,
                                                               replaced_at.get(snapshot.parent_snapshot_id, 2**63))
        settled = (time.time() - 60 * self.history_grace_minutes) * 1000
        expired = [snapshot for snapshot in iceberg.snapshots() if snapshot.snapshot_id not in heads
                   and replaced_at.get(snapshot.snapshot_id, snapshot.timestamp_ms) <= settled]
        if not expired:
            return 0
        gone = {snapshot.snapshot_id for snapshot in expired}
        # a file goes when no remaining snapshot holds it (each file is live in the one that added it)
        manifests: dict[str, list[str]] = {}  # a manifest's live files: snapshots share manifests, read each once
        kept = set().union(*(_files_of(snapshot, iceberg.io, manifests) for snapshot in iceberg.snapshots()
                             if snapshot.snapshot_id not in gone))
        dropped = set().union(*(_files_of(snapshot, iceberg.io, manifests) for snapshot in expired)) - kept
        iceberg.maintenance.expire_snapshots().by_ids(sorted(gone)).commit()
        deleted = 0
        for path in sorted(dropped):
            try:
                iceberg.io.delete(path)
                deleted += 1
            except FileNotFoundError:  # another expiry deleted it meanwhile
                pass
        return deleted


def _days(day: str | dt.date, day_only: bool, where: Where = None):
    """The rows of the days up to `day`, or of that day only; with `where`, only those whose
    columns hold these values (a value, or any of a list) — pushed down to the scan's files."""
    from pyiceberg.expressions import And, EqualTo, In, LessThanOrEqual

    rows = (EqualTo if day_only else LessThanOrEqual)(PARTITION_COLUMN, str(day))
    for column, value in sorted((where or {}).items()):
        rows = And(rows, In(column, list(value)) if isinstance(value, (list, tuple, set)) else EqualTo(column, value))
    return rows


def _files_of(snapshot, io, read: dict[str, list[str]]) -> set[str]:
    """A snapshot's manifest list, manifests and live data files (not those it deletes); `read`:
    the manifests read so far, by path, with their live files."""
    manifests = snapshot.manifests(io)
    files = {snapshot.manifest_list, *(manifest.manifest_path for manifest in manifests)}
    for manifest in manifests:
        if manifest.manifest_path not in read:
            read[manifest.manifest_path] = [entry.data_file.file_path for entry in
                                            manifest.fetch_manifest_entry(io, discard_deleted=True)]
        files.update(read[manifest.manifest_path])
    return files


def _marker(day: str | dt.date, keys: dict[str, str] | None) -> str:
    """The table property that holds the fingerprint of a day's (or a day and keys') last write."""
    return FINGERPRINT_PROPERTY + str(day) + "".join(f".{column}={value}" for column, value in sorted((keys or {}).items()))


def _day_rows(day: str, keys: dict[str, str] | None):
    """The rows a write of (day, keys) replaces."""
    from pyiceberg.expressions import And, EqualTo

    rows = EqualTo(PARTITION_COLUMN, day)
    for column, value in sorted((keys or {}).items()):
        rows = And(rows, EqualTo(column, value))
    return rows


def _day_schema(schema: pa.Schema) -> pa.Schema:
    if PARTITION_COLUMN in schema.names:
        schema = schema.remove(schema.get_field_index(PARTITION_COLUMN))
    return schema.append(pa.field(PARTITION_COLUMN, pa.string()))


def _with_day(data: pa.Table, day: str) -> pa.Table:
    if PARTITION_COLUMN in data.column_names:
        data = data.drop_columns([PARTITION_COLUMN])
    return data.append_column(PARTITION_COLUMN, pa.array([day] * data.num_rows, pa.string()))


def _table_for(catalog, name: str, schema: pa.Schema):
    """The table, created on first use: identity-partitioned by day (string, yyyy-mm-dd)."""
    from pyiceberg.exceptions import CommitFailedException, NamespaceAlreadyExistsError, TableAlreadyExistsError
    from pyiceberg.transforms import IdentityTransform

    if catalog.table_exists(name):
        return catalog.load_table(name)
    namespace = name.rsplit(".", 1)[0]
    try:
        catalog.create_namespace(namespace)
    except NamespaceAlreadyExistsError:
        pass
    except Exception:
        # the SQL catalog checks, then inserts: a writer that loses that race gets the database's
        # unique violation (seen with ten writers of a new table); the namespace is there then
        if not catalog.namespace_exists(namespace):
            raise
    try:
        with catalog.create_table_transaction(name, schema=schema) as create:  # created with its spec, at once
            with create.update_spec() as spec:
                spec.add_field(PARTITION_COLUMN, IdentityTransform(), PARTITION_COLUMN)
    except (TableAlreadyExistsError, CommitFailedException):  # another writer created it first (a REST
        pass                                                    # catalog says so as a failed commit, 409)
    return catalog.load_table(name)
