"""The one way a stage after ingestion keeps its table: decide, build, record, give verdicts.

Stages after ingestion keep one current table each, built as of the partition's day from all
batches up to it (recomputable state must not grow the file by gigabytes a day). Every such stage
is a `current_state_asset`, which does for it, once and the same way:

1. **Fingerprint** exactly what the build depends on: its declared inputs' content (the raw
   batches up to the day, or the upstream build's fingerprint and version), its *semantic*
   config, its code version and any extra the stage names (the SQL parameters). Operational
   knobs and check thresholds (`knob(...)` fields: chunk sizes, threads, log intervals,
   thresholds) are left out: changing one is a skip, never a rebuild.
2. **Decide**: build on the first run, on `force`, when the fingerprint changed, or when the
   last build was *incomplete* (it left open dead letters or failed a blocking check); skip when
   unchanged, or when the table already holds a later day and nothing that day's build read
   changed (tables only move forward unless forced; a change rebuilds as of the later day). A
   build refuses to run when one of its inputs holds a later day than the build's, or when an
   input's last build failed a blocking check.
3. **Build** through a guarded warehouse: the build may read only its declared inputs' tables
   (and its own, and the `ops.*` machinery); any other pipeline table fails the step
   (`UndeclaredInputError`), so declared dependencies cannot drift from what the code reads.
4. **Record**, inside the build's final write transaction (`StateBuild.record`): the
   fingerprint, the measurements its checks are computed from, whether it is complete, and a
   new version (downstream fingerprints include it). A concurrent build of the same stage
   (another run) is detected there and the step retries.
5. **Verdicts**: checks are a pure function of the stored measurements and the config. A built
   run and a skipped run both compute them from the measurements stored with the build, so a
   failed check stays failed on every skipped re-run (never a fresh pass), and a changed
   threshold applies at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import json
import re
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

import dagster as dg
import duckdb
import sqlglot
from pydantic import Field
from sqlglot import exp

from assets.common.partitions import daily_partitions
from assets.common.range_runs import range_days, verdicts_on_every_day
from assets.common.sources import SOURCES, Source
from resources import dead_letters
from resources.model_clients.errors import ModelConfigurationError
from assets.common.catalog import code_references
from assets.common.metadata import table_schema
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse, fetch_all, step_pool, table_exists

STATE_TABLE = "ops.asset_state"
PII_TAG = {"pii": "true"}  # on every asset whose table holds personal data (shown in the UI)
PIPELINE_SCHEMAS = ("raw", "analytics", "ml", "outputs")  # `ops` is machinery any stage may use
OPERATIONAL = "operational"

# Filled as assets are defined: table -> the asset that writes it; ingestion asset -> its source.
_TABLE_OWNERS: dict[str, str] = {}
_RAW_SOURCES: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# Config: semantic fields vs knobs
# ---------------------------------------------------------------------------------------------

def knob(default: Any, description: str, **kwargs: Any) -> Any:
    """A config field that changes how a build runs or is judged, never what it produces (chunk
    sizes, threads, log intervals, check thresholds): it is not part of the fingerprint."""
    return Field(default=default, description=description, json_schema_extra={OPERATIONAL: True}, **kwargs)


class StateConfig(dg.Config):
    """Run config every current-state stage has."""

    force: bool = knob(False, "Rebuild even when nothing changed, or rebuild as of an older day than the table holds.")


class DeadLetterConfig(StateConfig):
    """Run config of a stage that dead-letters items (a model call or its own computation)."""

    max_failed_share: float = knob(
        0.01, "The blocking check dead_letter_share fails when more than this share of the items ends in the DLQ.")


def semantic_config(config: dg.Config) -> dict[str, Any]:
    """The config fields that change what a build produces (everything but the knobs)."""
    fields = type(config).model_fields
    return {name: value for name, value in config.model_dump().items()
            if not (fields[name].json_schema_extra or {}).get(OPERATIONAL)}


# ---------------------------------------------------------------------------------------------
# The state table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredState:
    as_of: dt.date
    fingerprint: str
    row_count: int
    measurements: dict[str, Any]
    complete: bool
    incomplete_reason: str | None
    version: int


def ensure_state_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("CREATE SCHEMA IF NOT EXISTS ops")
    con.execute(
        f"""CREATE TABLE IF NOT EXISTS {STATE_TABLE} (
            asset VARCHAR PRIMARY KEY, as_of DATE, fingerprint VARCHAR, row_count BIGINT,
            built_at TIMESTAMP, metadata JSON)"""
    )
    # Columns added after the first release; a row without them (NULL) counts as incomplete.
    for column, kind in (("complete", "BOOLEAN"), ("incomplete_reason", "VARCHAR"), ("version", "BIGINT")):
        con.execute(f"ALTER TABLE {STATE_TABLE} ADD COLUMN IF NOT EXISTS {column} {kind}")


def read_state(con: duckdb.DuckDBPyConnection, asset: str) -> StoredState | None:
    if not table_exists(con, STATE_TABLE):
        return None
    columns = {name for (name,) in fetch_all(
        con, "SELECT column_name FROM information_schema.columns WHERE table_schema = 'ops' AND table_name = 'asset_state'")}
    extra = ", ".join(c if c in columns else f"NULL AS {c}" for c in ("complete", "incomplete_reason", "version"))
    rows = fetch_all(con, f"SELECT as_of, fingerprint, row_count, metadata, {extra} FROM {STATE_TABLE} WHERE asset = ?",
                     [asset])
    if not rows:
        return None
    as_of, fingerprint, row_count, metadata, complete, reason, version = rows[0]
    return StoredState(as_of, fingerprint, row_count or 0, json.loads(metadata or "{}"), bool(complete), reason,
                       version or 0)


def _write_state(con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date, fingerprint: str, row_count: int,
                 measurements: Mapping[str, Any], incomplete_reason: str | None, version: int) -> None:
    ensure_state_table(con)
    con.execute(
        f"""INSERT OR REPLACE INTO {STATE_TABLE} (asset, as_of, fingerprint, row_count, built_at, metadata,
                complete, incomplete_reason, version)
            VALUES (?, ?, ?, ?, now()::TIMESTAMP, ?, ?, ?, ?)""",
        [asset, as_of, fingerprint, row_count, json.dumps(measurements, default=str), incomplete_reason is None,
         incomplete_reason, version],
    )


def write_state(con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date, fingerprint: str, row_count: int,
                measurements: Mapping[str, Any] | None = None) -> None:
    """Record a complete build made outside a current-state asset (tables seeded by hand, tests)."""
    stored = read_state(con, asset)
    _write_state(con, asset, as_of, fingerprint, row_count, measurements or {}, None,
                 (stored.version if stored else 0) + 1)


# ---------------------------------------------------------------------------------------------
# Fingerprints and the decision
# ---------------------------------------------------------------------------------------------

def fingerprint_of(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def as_of_day(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> dt.date:
    """The last day covered by the run's partition (range): state is built as of that day."""
    window = context.partition_time_window
    return (window.end - dt.timedelta(days=1)).date()


def raw_source_of(asset: str) -> str | None:
    """The landing source an ingestion asset reads (None for any other asset)."""
    return _RAW_SOURCES.get(asset)


def input_fingerprint(con: duckdb.DuckDBPyConnection, asset: str, as_of: dt.date) -> str:
    """The content of an input as of a day: its landed batches up to the day (raw assets), or
    its last build's fingerprint and version (a new build downstream of any rebuild)."""
    source = raw_source_of(asset)
    if source is not None:
        rows = fetch_all(
            con, "SELECT partition_date, fingerprint FROM ops.batch_fingerprints WHERE source = ? AND partition_date <= ?"
                 " ORDER BY partition_date", [source, as_of],
        ) if table_exists(con, "ops.batch_fingerprints") else []
        # No batch yet is a valid state (a deployment may use only some sources): it fingerprints as empty.
        return fingerprint_of([(str(day), fp) for day, fp in rows])
    state = read_state(con, asset)
    if state is None:
        raise dg.Failure(f"input {asset!r} has not been materialized yet; materialize it first", allow_retries=False)
    return f"{state.fingerprint}:v{state.version}"


@dataclass(frozen=True)
class BuildDecision:
    build: bool
    reason: str
    fingerprint: str
    stored: StoredState | None


def decide(stored: StoredState | None, as_of: dt.date, fingerprint: str, force: bool) -> BuildDecision:
    if force:
        return BuildDecision(True, "forced by run config", fingerprint, stored)
    if stored is None:
        return BuildDecision(True, "first build", fingerprint, stored)
    if stored.as_of > as_of:
        return BuildDecision(False, f"the table already holds a later day ({stored.as_of}), and nothing that day's "
                                    "build read has changed: it stands (a change would rebuild it as of that day); "
                                    "force would rebuild it as of this day, going back", fingerprint, stored)
    if stored.fingerprint != fingerprint:
        return BuildDecision(True, "inputs changed", fingerprint, stored)
    if not stored.complete:
        why = stored.incomplete_reason or "its outcome was not recorded"
        return BuildDecision(True, f"retrying: the build as of {stored.as_of} was incomplete ({why})", fingerprint, stored)
    return BuildDecision(False, f"inputs unchanged since the build as of {stored.as_of}", fingerprint, stored)


def later_inputs(con: duckdb.DuckDBPyConnection, inputs: Iterable[str], as_of: dt.date) -> dict[str, str]:
    """Inputs whose table holds a later day than `as_of` (building on them would mislabel the day)."""
    later = {}
    for name in inputs:
        if raw_source_of(name) is None:
            state = read_state(con, name)
            if state is not None and state.as_of > as_of:
                later[name] = str(state.as_of)
    return later


# ---------------------------------------------------------------------------------------------
# Declared inputs are the only ones a build may read
# ---------------------------------------------------------------------------------------------

class UndeclaredInputError(RuntimeError):
    """A build touched a pipeline table that is neither its own nor one of its declared inputs'."""


def register_tables(asset: str, tables: Iterable[str], source: str | None = None) -> None:
    """Declare the tables an asset writes (and, for an ingestion asset, the source it lands)."""
    for table in tables:
        _TABLE_OWNERS[table.lower()] = asset
    if source is not None:
        _RAW_SOURCES[asset] = source


def register_sources(sources: Iterable[Source]) -> None:
    """Declare the ingestion assets of a source registry and the raw tables they write."""
    for source in sources:
        register_tables(source.asset, [table.qualified for table in source.tables], source=source.name)


def tables_of(asset: str) -> set[str]:
    return {table for table, owner in _TABLE_OWNERS.items() if owner == asset}


@lru_cache(maxsize=4096)
def pipeline_tables_in(sql: str) -> frozenset[str]:
    """The `schema.table` names of pipeline schemas a SQL text refers to."""
    try:
        statements = sqlglot.parse(sql, read="duckdb")
        names = {f"{t.db}.{t.name}".lower() for s in statements if s is not None
                 for t in s.find_all(exp.Table) if t.db and t.name}
    except sqlglot.errors.SqlglotError:  # a statement sqlglot cannot parse: fall back to the names' shape
        names = {m.lower() for m in re.findall(r"\b(?:raw|analytics|ml|outputs)\.[A-Za-z_][A-Za-z0-9_]*", sql)}
    return frozenset(n for n in names if n.split(".", 1)[0] in PIPELINE_SCHEMAS)


def _register_every_asset() -> None:
    """Tables are registered as their assets are defined; a build running without the whole code
    location imported (a test materializing one stage) learns the other owners here."""
    import definitions  # noqa: F401, PLC0415 (defining every asset registers its tables)


class TableGuard:
    """Allows an asset's own tables (and side tables named after them), its inputs' tables and ops.*."""

    def __init__(self, asset: str, inputs: Iterable[str]):
        self.asset, self.inputs = asset, tuple(inputs)

    def check(self, sql: str) -> None:
        if any(table not in _TABLE_OWNERS for table in pipeline_tables_in(sql)):
            _register_every_asset()
        own = tables_of(self.asset)
        allowed = own | {t for name in self.inputs for t in tables_of(name)}
        for table in pipeline_tables_in(sql):
            if table in allowed or any(table.startswith(f"{mine}_") for mine in own):
                continue
            owner = _TABLE_OWNERS.get(table, "no asset")
            raise UndeclaredInputError(
                f"{self.asset} reads {table} (written by {owner}), which is not among its declared inputs "
                f"{list(self.inputs)}: declare {owner!r} as an input, or stop reading it")


class GuardedConnection:
    """A DuckDB connection whose SQL passes the guard first; everything else is the connection's."""

    def __init__(self, con: duckdb.DuckDBPyConnection, guard: TableGuard):
        self._con, self._guard = con, guard

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._guard.check(sql)
        return self._con.execute(sql, *args, **kwargs)

    def executemany(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._guard.check(sql)
        return self._con.executemany(sql, *args, **kwargs)

    def sql(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        self._guard.check(sql)
        return self._con.sql(sql, *args, **kwargs)

    query = sql

    def table(self, name: str) -> Any:
        self._guard.check(f"SELECT * FROM {name}")
        return self._con.table(name)

    def cursor(self) -> GuardedConnection:
        return GuardedConnection(self._con.cursor(), self._guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


class GuardedWarehouse:
    """The warehouse as a build sees it: the same file and lock, guarded connections."""

    def __init__(self, warehouse: DuckDBWarehouse, guard: TableGuard):
        self._warehouse, self._guard = warehouse, guard

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[GuardedConnection]:
        with self._warehouse.connect(read_only=read_only) as con:
            yield GuardedConnection(con, self._guard)

    @contextmanager
    def transaction(self) -> Iterator[GuardedConnection]:
        with self._warehouse.transaction() as con:
            yield GuardedConnection(con, self._guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._warehouse, name)


# ---------------------------------------------------------------------------------------------
# The build's view, its outcome and the asset factory
# ---------------------------------------------------------------------------------------------

Verdicts = Callable[[Mapping[str, Any], Any], list[dg.AssetCheckResult]]


def all_verdicts(spec: StageSpec, measured: Mapping[str, Any], config: Any) -> list[dg.AssetCheckResult]:
    """The stage's own verdicts, and the dead-letter share of a stage that dead-letters."""
    checks = spec.verdicts(measured, config) if spec.verdicts else []
    if spec.dead_letter_stage:
        checks.append(dead_letter_verdict(measured, config))
    return checks


class ConcurrentBuildError(RuntimeError):
    pass


@dataclass
class Built:
    """What a build returns besides its recorded state: materialization metadata."""

    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]
    verdicts: Verdicts | None
    dead_letter_stage: str | None
    blocking_checks: frozenset[str]
    table: str | None = None  # the table the catalog shows (`dagster/table_name`): the first it writes
    # Its tables are what consumers read (nothing downstream could block them): a build whose
    # blocking check fails is rolled back, so they keep the last good build.
    served: bool = False


class StateBuild:
    """What a build gets: the day, its config, resources, a guarded warehouse, and `record`."""

    def __init__(self, spec: StageSpec, context: dg.AssetExecutionContext, config: Any, as_of: dt.date,
                 decision: BuildDecision):
        self.spec, self.context, self.config, self.as_of, self.decision = spec, context, config, as_of, decision
        self.log = context.log
        self.resources = context.resources
        self.warehouse = GuardedWarehouse(context.resources.warehouse, TableGuard(spec.name, spec.inputs))
        self.check_results: list[dg.AssetCheckResult] = []
        self.measurements: dict[str, Any] = {}
        self.recorded = False

    @property
    def partition_key(self) -> str:
        """The day the build is as of: the run's partition, or the last day of its range."""
        return self.as_of.isoformat()

    def record(self, con: Any, row_count: int, measurements: Mapping[str, Any] | None = None) -> None:
        """Call once, inside the transaction that publishes the table: records the fingerprint,
        the measurements the checks are computed from, completeness and a new version."""
        stored_now = read_state(con, self.spec.name)
        expected = self.decision.stored.version if self.decision.stored else None
        if (stored_now.version if stored_now else None) != expected:
            raise ConcurrentBuildError(f"{self.spec.name} was rebuilt by another run meanwhile")
        measured = dict(measurements or {})
        if self.spec.dead_letter_stage:
            if "items" not in measured:
                raise RuntimeError(f"{self.spec.name}: a stage that dead-letters records how many items it processed")
            measured["dlq_open"] = dead_letters.count_open_items(con, self.spec.dead_letter_stage)
        checks = all_verdicts(self.spec, measured, self.config)
        reason = incomplete_reason(measured, checks, self.spec.blocking_checks)
        if self.spec.served:
            refuse_to_serve_a_failed_build(self.spec, checks)
        version = (stored_now.version if stored_now else 0) + 1
        _write_state(con, self.spec.name, self.as_of, self.decision.fingerprint, row_count, measured, reason, version)
        self.check_results, self.measurements, self.recorded = checks, measured, True


def failed_blocking(checks: Iterable[dg.AssetCheckResult], blocking: Container[str]) -> list[dg.AssetCheckResult]:
    """The checks that block what builds on the build: failed, at ERROR, declared blocking."""
    return [c for c in checks if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR and c.check_name in blocking]


def refuse_to_serve_a_failed_build(spec: StageSpec, checks: list[dg.AssetCheckResult]) -> None:
    """Raises inside the build's transaction when a blocking check failed: its tables roll back to
    the last good build."""
    failed = failed_blocking(checks, spec.blocking_checks)
    if not failed:
        return
    raise dg.Failure(f"{spec.name}: not served, a blocking check failed (its tables keep the last good build): "
                     + "; ".join(f"{c.check_name}: {c.description}" for c in failed),
                     metadata={"failed_checks": [c.check_name for c in failed]}, allow_retries=False)


DEAD_LETTER_CHECK = "dead_letter_share"


def dead_letter_verdict(measured: Mapping[str, Any], config: DeadLetterConfig) -> dg.AssetCheckResult:
    """More than `max_failed_share` of the items in the DLQ means the table is not what it should be."""
    items, still_open = measured["items"], measured["dlq_open"]
    share = still_open / items if items else float(still_open > 0)
    return dg.AssetCheckResult(
        check_name=DEAD_LETTER_CHECK,
        passed=share <= config.max_failed_share,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"dlq_open": still_open, "items": items, "dlq_share": round(share, 6),
                  "max_failed_share": config.max_failed_share},
        description=f"{still_open:,} of {items:,} items in the dead-letter queue ({share:.2%}; at most "
                    f"{config.max_failed_share:.2%} may be). Open items are retried by the next run.",
    )


BLOCKED = "failed blocking checks"  # in a stored incomplete_reason: nothing may build on that build


def incomplete_reason(measurements: Mapping[str, Any], checks: list[dg.AssetCheckResult],
                      blocking: frozenset[str]) -> str | None:
    """Why a build cannot count as an unchanged success next time, or None."""
    reasons = []
    if measurements.get("dlq_open"):
        reasons.append(f"{measurements['dlq_open']} open dead letters")
    failed = [c.check_name for c in failed_blocking(checks, blocking)]
    if failed:
        reasons.append(f"{BLOCKED} {failed}")
    return "; ".join(reasons) or None


def blocked_inputs(con: duckdb.DuckDBPyConnection, inputs: Iterable[str]) -> dict[str, str]:
    """The inputs whose stored last build failed a blocking check, with why. Dagster's rule blocks
    what reads such a build only in its own run; a later run that selected only the outputs read
    the gap and was green (outputs served without the customers whose recommendations were
    dead-lettered; found by an outside-in probe)."""
    return {name: state.incomplete_reason for name in inputs
            if (state := read_state(con, name)) is not None and BLOCKED in (state.incomplete_reason or "")}


def current_state_asset(
    *,
    name: str,
    inputs: Iterable[str],
    tables: Iterable[str],
    group: str,
    config_class: type[StateConfig] = StateConfig,
    checks: Iterable[dg.AssetCheckSpec] = (),
    verdicts: Verdicts | None = None,
    resources: Iterable[str] = ("warehouse",),
    pool: str | None = WAREHOUSE_POOL,
    kinds: Iterable[str] = ("duckdb", "python"),
    description: str | None = None,
    code_version: str | None = None,
    fingerprint_extra: Callable[[dg.AssetExecutionContext, dt.date], Any] | None = None,
    dead_letter_stage: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    personal_data: bool = False,
    retry_policy: dg.RetryPolicy | None = None,
    priority: int = 0,
    served: bool = False,
) -> Callable[[Callable[[StateBuild], Built]], dg.AssetsDefinition]:
    """Make a daily-partitioned current-state asset from a build function (see the module doc).
    `priority`: a run launches its step before the ready steps of lower priority."""
    inputs, tables, checks = tuple(inputs), tuple(tables), tuple(checks)
    if dead_letter_stage:
        if not issubclass(config_class, DeadLetterConfig):
            raise TypeError(f"{name} dead-letters items: its config must be a DeadLetterConfig")
        checks += (dg.AssetCheckSpec(DEAD_LETTER_CHECK, asset=name, blocking=True,
                                     description="At most max_failed_share of the items end in the DLQ."),)
    register_tables(name, tables)
    spec = StageSpec(name, inputs, verdicts, dead_letter_stage,
                     frozenset(c.name for c in checks if c.blocking), tables[0] if tables else None, served)

    def decorate(build: Callable[[StateBuild], Built]) -> dg.AssetsDefinition:
        recipe = StageRecipe(spec, build, config_class, checks, tuple(resources), fingerprint_extra, code_version,
                             description or inspect.getdoc(build), personal_data)
        _STAGES[name] = recipe

        def body(context: dg.AssetExecutionContext, config: Any) -> Iterator[Any]:
            yield from checks_per_day(context, materialize_stage(recipe, context, config))

        body.__name__ = name
        body.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
            inspect.Parameter("context", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=dg.AssetExecutionContext),
            inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=config_class),
        ])
        return dg.asset(
            name=name,
            deps=list(inputs),
            partitions_def=daily_partitions,
            backfill_policy=dg.BackfillPolicy.single_run(),
            group_name=group,
            **step_pool(pool, priority),
            kinds=set(kinds),
            check_specs=list(checks),
            required_resource_keys=set(resources),
            description=description or inspect.getdoc(build),
            code_version=code_version,
            metadata={"tables": list(tables), **code_references(build), **(metadata or {})},
            tags=PII_TAG if personal_data else None,
            retry_policy=retry_policy,
        )(body)

    return decorate


def checks_per_day(context: dg.AssetExecutionContext, result: dg.MaterializeResult) -> Iterator[Any]:
    """A stage's result; in a run over a range of days, with its checks reported for every day the
    build covers (range_runs.verdicts_on_every_day; found by an outside-in probe). A failed
    blocking check still fails the step, as it does in a one-day run, so nothing after it builds
    on the gap."""
    days = range_days(context)
    if len(days) <= 1 or not result.check_results:
        yield result
        return
    yield dg.MaterializeResult(metadata=result.metadata)  # every day of the range, as before
    blocking = {spec.name: spec.blocking for spec in context.assets_def.check_specs}
    asset = context.assets_def.key.to_user_string()
    yield from verdicts_on_every_day(context, asset, list(result.check_results), blocking, days)
    failed = failed_blocking(result.check_results, {name for name, blocks in blocking.items() if blocks})
    if failed:
        raise dg.Failure(f"{asset}: {len(failed)} blocking check(s) failed for the days {days[0]}..{days[-1]}: "
                         + "; ".join(f"{c.check_name}: {c.description}" for c in failed),
                         metadata={"failed_checks": [c.check_name for c in failed]}, allow_retries=False)


@dataclass(frozen=True)
class StageRecipe:
    """Everything a current-state asset is made of: another backend runs the same build from it
    (assets/common/lakehouse_stages.py)."""

    spec: StageSpec
    build: Callable[[StateBuild], Built]
    config_class: type[StateConfig]
    checks: tuple[dg.AssetCheckSpec, ...]
    resources: tuple[str, ...]
    fingerprint_extra: Callable[[dg.AssetExecutionContext, dt.date], Any] | None  # (context, the build's day)
    code_version: str | None
    description: str | None
    personal_data: bool


_STAGES: dict[str, StageRecipe] = {}


def stage_recipe(name: str) -> StageRecipe:
    if name not in _STAGES:
        _register_every_asset()
    return _STAGES[name]


def stage_names() -> list[str]:
    """Every current-state stage of the code location."""
    _register_every_asset()
    return sorted(_STAGES)


def dead_letter_stages() -> list[str]:
    """The stages that dead-letter items (a stage's own name, or the part of it that calls a model)."""
    _register_every_asset()
    return sorted({recipe.spec.dead_letter_stage for recipe in _STAGES.values() if recipe.spec.dead_letter_stage})


class StageDecision(NamedTuple):
    decision: BuildDecision
    later: dict[str, str]  # inputs that hold a later day (when it would build)
    as_of: dt.date  # the day it builds as of
    blocked: dict[str, str]  # inputs whose last build failed a blocking check (when it would build)


def decide_stage(recipe: StageRecipe, context: dg.AssetExecutionContext, config: Any) -> StageDecision:
    """Whether the stage builds (from the stored states of it and its inputs), as of which day,
    and, when it would, the inputs that hold a later day or whose last build failed a blocking
    check (one read connection for all of it).

    The day is the run's. But when the table already holds a later day X and this run changed
    what X's build read (an earlier day landed late, was corrected or backfilled), the stage
    builds again as of X, so the current tables take the change now: it used to skip, green,
    saying a run of X would, and after a backfill nothing asked for X (found by an outside-in
    probe). A lake stage never sees a later day: its states are read up to the run's day."""
    spec, as_of = recipe.spec, as_of_day(context)
    with context.resources.warehouse.connect(read_only=True) as con:
        stored = read_state(con, spec.name)
        fingerprint = _fingerprint(recipe, context, config, con, as_of)
        decision = decide(stored, as_of, fingerprint, config.force)
        if not decision.build and stored is not None and stored.as_of > as_of and not config.force:
            at_table_day = _fingerprint(recipe, context, config, con, stored.as_of)
            if at_table_day != stored.fingerprint:
                as_of = stored.as_of
                decision = BuildDecision(True, f"caught up: this run changed the inputs of the table's day ({as_of}; "
                                               "an earlier day landed, was corrected or backfilled): built again as "
                                               f"of {as_of}", at_table_day, stored)
        if not decision.build:
            return StageDecision(decision, {}, as_of, {})
        return StageDecision(decision, later_inputs(con, spec.inputs, as_of), as_of, blocked_inputs(con, spec.inputs))


def _fingerprint(recipe: StageRecipe, context: dg.AssetExecutionContext, config: Any,
                 con: duckdb.DuckDBPyConnection, as_of: dt.date) -> str:
    upstream = {name: input_fingerprint(con, name, as_of) for name in recipe.spec.inputs}
    extra = recipe.fingerprint_extra(context, as_of) if recipe.fingerprint_extra else None
    return fingerprint_of(recipe.code_version, semantic_config(config), upstream, extra)


def materialize_stage(recipe: StageRecipe, context: dg.AssetExecutionContext, config: Any) -> dg.MaterializeResult:
    spec, build = recipe.spec, recipe.build
    started = time.perf_counter()
    decision, later, as_of, blocked = decide_stage(recipe, context, config)
    if later and config.force:
        raise dg.Failure(
            f"{spec.name} as of {as_of}: its inputs hold later days {later}. Rebuild them as of {as_of} first "
            "(force), or materialize the partition of their day.", metadata={"later_inputs": later},
            allow_retries=False)
    if later and decision.stored is None:  # no build a skip could stand for
        latest = max(later.values())
        raise dg.Failure(
            f"{spec.name} has never been built, and its inputs already hold a later day ({later}): run the "
            f"partition {latest} (its run builds this table), or rebuild the inputs as of {as_of} first (force).",
            metadata={"later_inputs": later}, allow_retries=False)
    if later:  # a later day's run built the inputs: that run builds this table too
        decision = BuildDecision(False, f"its inputs already hold a later day ({later}): the run of that day "
                                        "builds this table", decision.fingerprint, decision.stored)
    if not decision.build:
        return _skipped(spec, context, config, as_of, decision, started)
    if blocked:  # the stage refuses until those inputs build again
        raise dg.Failure(
            f"{spec.name} does not build on an input whose last build failed a blocking check: "
            + "; ".join(f"{name} ({reason})" for name, reason in blocked.items())
            + ". Build those inputs again first (a plain run of them retries what they left open).",
            metadata={"blocked_inputs": blocked}, allow_retries=False)
    state_build = StateBuild(spec, context, config, as_of, decision)
    try:
        built = build(state_build)
    except ConcurrentBuildError as error:
        context.log.warning(f"{error}: deciding again")
        raise dg.RetryRequested(max_retries=3, seconds_to_wait=1.0) from error
    except ModelConfigurationError as error:
        raise dg.Failure(description=str(error), metadata={"status": error.status}, allow_retries=False) from None
    except duckdb.OutOfMemoryException as error:
        # The limit comes from the step memory budget and what the process holds, the same in a
        # fresh process: a retry fails the same way after its backoff (three attempts, 3.5 min at 2M).
        raise dg.Failure(
            description=f"{spec.name} ran out of DuckDB memory; not retried, the same data fails the same way. "
                        "Raise STEP_MEMORY_BUDGET (or DUCKDB_MEMORY_LIMIT), and report the query: it should "
                        f"spill. DuckDB: {str(error).splitlines()[0]}",
            metadata={"step_memory_budget": str(context.resources.warehouse.step_memory_budget)},
            allow_retries=False) from error
    if not state_build.recorded:
        raise RuntimeError(f"{spec.name}: the build returned without recording its state (StateBuild.record)")
    seconds = time.perf_counter() - started
    context.log.info(f"{spec.name} built as of {as_of} in {seconds:.1f}s ({decision.reason})")
    return dg.MaterializeResult(
        metadata={
            **_table_metadata(spec, context, described="dagster/column_schema" in built.metadata),
            **built.metadata,
            "as_of": str(as_of),
            "build_reason": decision.reason,
            "fingerprint": decision.fingerprint,
            "seconds": round(seconds, 3),
            "skipped": False,
        },
        check_results=state_build.check_results,
    )


def _table_metadata(spec: StageSpec, context: dg.AssetExecutionContext, described: bool = False) -> dict[str, Any]:
    """The table's real columns as built (the catalog's column schema), read in a short connection;
    `described`: the build returned them, read inside its own transaction (no trip to the lock)."""
    if spec.table is None:
        return {}
    if described:
        return {"dagster/table_name": spec.table}
    with context.resources.warehouse.connect(read_only=True) as con:
        if not table_exists(con, spec.table):
            return {}
        return {"dagster/table_name": spec.table, "dagster/column_schema": table_schema(con, spec.table)}


def _skipped(spec: StageSpec, context: dg.AssetExecutionContext, config: Any, as_of: dt.date,
             decision: BuildDecision, started: float) -> dg.MaterializeResult:
    """The stored build stands: its checks are computed again from its stored measurements."""
    stored = decision.stored  # a skip always stands for a stored build (materialize_stage)
    context.log.info(f"skipped: {decision.reason}")
    checks = all_verdicts(spec, stored.measurements, config)
    built_as_of = str(stored.as_of)
    checks = [c._replace(metadata={**c.metadata, "verdict_of_build_as_of": dg.MetadataValue.text(built_as_of)})
              for c in checks]
    return dg.MaterializeResult(
        metadata={
            "skipped": True,
            "skip_reason": decision.reason,
            "as_of": str(as_of),
            "built_as_of": built_as_of,
            "fingerprint": decision.fingerprint,
            "dagster/row_count": stored.row_count,
            "model_calls": 0,
            "seconds": round(time.perf_counter() - started, 3),
        },
        check_results=checks,
    )


register_sources(SOURCES)
