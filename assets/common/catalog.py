"""What the Dagster catalog shows about each asset: its owner, its domain, the table it is, its
columns, where its code lives, and how its network steps are retried.

Applied once to every asset in `definitions.py`, so a new stage gets it by being in a group.
Columns: a raw table's come from the source registry (known before anything ran); every other
table reports its real columns (`DESCRIBE`) with each materialization (current_state.py).
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from assets.common.sources import RawTable, Source

# Who answers for a stage, by its room (group). Dagster takes e-mails or `team:<name>`.
OWNERS = {
    "ingest": "team:data-platform",
    "validate": "team:data-platform",
    "monitor": "team:data-platform",
    "transform": "team:analytics-engineering",
    "infer": "team:ml",
    "evaluate": "team:ml",
    "outputs": "team:ml",
}
DOMAINS = {
    "ingest": "ingestion",
    "validate": "ingestion",
    "transform": "analytics",
    "infer": "ml",
    "evaluate": "ml",
    "outputs": "serving",
    "monitor": "observability",
}

# Steps that call a model over the network. A call that fails is retried by the client and then
# dead-lettered; what reaches the step is an outage longer than the client waits for
# (max_outage_seconds) or a lost warehouse lock. The whole step is tried again later; its answered
# items are cached, so a retry pays only for what is left. Configuration errors (dg.Failure with
# allow_retries=False) are never retried.
NETWORK_RETRY_POLICY = dg.RetryPolicy(
    max_retries=2, delay=60, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)

# Asset health in the UI: a landing source that has not landed a day for 30 hours is late (WARN);
# after 4 days (a long weekend and a bit) it fails. The freshness sensor judges each partition
# against the calendar (assets/monitor/freshness.py); this is the catalog's coarse view of it.
LANDING_FRESHNESS = dg.FreshnessPolicy.time_window(fail_window=dt.timedelta(days=4),
                                                  warn_window=dt.timedelta(hours=30))

# Columns every raw table lands with before its own.
RAW_KEY_COLUMNS = {"partition_date": "DATE", "line_no": "BIGINT"}


def raw_table_schema(table: RawTable) -> dg.TableSchema:
    columns = {**RAW_KEY_COLUMNS, **table.columns}
    return dg.TableSchema(columns=[
        dg.TableColumn(name, kind, description=_personal_note(table, name), tags=_personal_tags(table, name))
        for name, kind in columns.items()])


def _personal_note(table: RawTable, column: str) -> str | None:
    how = table.personal.get(column)
    return f"personal data: {how}ed on every way out of the warehouse" if how else None


def _personal_tags(table: RawTable, column: str) -> dict[str, str] | None:
    return {"pii": "true"} if column in table.personal else None


def table_metadata(spec: dg.AssetSpec, sources: Sequence[Source]) -> dict[str, Any]:
    """`dagster/table_name` (the asset's first table) and, for a raw table, its declared columns."""
    by_asset = {source.asset: source for source in sources}
    if spec.key.to_user_string() in by_asset:
        first = by_asset[spec.key.to_user_string()].tables[0]
        return {"dagster/table_name": first.qualified, "dagster/column_schema": raw_table_schema(first)}
    tables = (spec.metadata or {}).get("tables")
    if isinstance(tables, list) and tables:
        return {"dagster/table_name": str(tables[0])}
    return {}


def catalog_entry(spec: dg.AssetSpec, sources: Sequence[Source]) -> dg.AssetSpec:
    group = spec.group_name or "default"
    return spec.replace_attributes(
        owners=spec.owners or ([OWNERS[group]] if group in OWNERS else []),
        freshness_policy=spec.freshness_policy or (LANDING_FRESHNESS if group == "ingest" else None),
    ).merge_attributes(
        tags={"domain": DOMAINS.get(group, group)},
        metadata={key: value for key, value in table_metadata(spec, sources).items() if key not in (spec.metadata or {})},
    )


def code_references(*places: Callable[..., Any] | Path) -> dict[str, dg.CodeReferencesMetadataValue]:
    """`dagster/code_references` to functions (file and line) or whole files (a SQL model)."""
    references = []
    for place in places:
        if isinstance(place, Path):
            references.append(dg.LocalFileCodeReference(file_path=str(place.resolve())))
        else:
            place = inspect.unwrap(place)
            references.append(dg.LocalFileCodeReference(
                file_path=str(Path(inspect.getsourcefile(place) or "").resolve()),
                line_number=inspect.getsourcelines(place)[1]))
    return {"dagster/code_references": dg.CodeReferencesMetadataValue(code_references=references)}


def with_catalog(assets: Sequence[Any], sources: Sequence[Source]) -> list[Any]:
    """Owners, domain tags, table names, raw columns and code references on every asset (an asset
    made by a factory names its own code; others get their decorated function's)."""
    catalogued = dg.map_asset_specs(lambda spec: catalog_entry(spec, sources), assets)
    return [asset if _has_code_references(asset) else dg.with_source_code_references([asset])[0]
            for asset in catalogued]


def _has_code_references(asset: Any) -> bool:
    specs = asset.specs if isinstance(asset, dg.AssetsDefinition) else [asset]
    return all("dagster/code_references" in (spec.metadata or {}) for spec in specs)
