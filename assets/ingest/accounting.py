"""What a landed batch adds up to: record accounting, error rates, the checks and the metadata.

Counts are recounted from what landed (the raw tables and `ops.schema_errors`), against the
records the reader saw in the file, so a skipped re-run reports exactly what a fresh one did.

Two error rates, both plain floats so the UI plots them:
- `error_rate` is per source record: a record is bad when it was quarantined or any part of it
  was (a customer with one bad purchase item is a bad record). The `error_rate` check judges it.
- `<part>.error_rate` (e.g. `customer_purchases.error_rate`) is the share of quarantined parts,
  reported beside it (the metric sensor watches it too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg
import duckdb

from assets.common.metadata import markdown_table
from assets.common.partitions import daily_partitions
from assets.common.sources import Source
from resources.warehouse import fetch_all, fetch_scalar


@dataclass
class TableCounts:
    input_records: int
    valid_records: int
    quarantined_records: int
    by_rule: dict[str, int]

    @property
    def error_rate(self) -> float:
        return self.quarantined_records / self.input_records if self.input_records else 0.0

    @property
    def reconciles(self) -> bool:
        return self.input_records == self.valid_records + self.quarantined_records


@dataclass
class BatchCounts:
    """A batch's counts per table, and its source records with an error anywhere in them."""

    tables: dict[str, TableCounts]
    bad_records: int

    @property
    def primary(self) -> TableCounts:
        return next(iter(self.tables.values()))

    @property
    def error_rate(self) -> float:
        """Bad source records / input records."""
        records = self.primary.input_records
        return self.bad_records / records if records else 0.0

    @property
    def rates(self) -> dict[str, float]:
        """The record-level rate, then each part's own rate (`customer_purchases.error_rate`)."""
        rates = {"error_rate": round(self.error_rate, 6)}
        for table, counts in list(self.tables.items())[1:]:
            rates[f"{table}.error_rate"] = round(counts.error_rate, 6)
        return rates


def no_records(source: Source) -> BatchCounts:
    """The counts of a day that landed nothing (a closed day)."""
    return BatchCounts({spec.name: TableCounts(0, 0, 0, {}) for spec in source.tables}, 0)


def count_partition(con: duckdb.DuckDBPyConnection, source: Source, partition_date: str,
                    inputs: dict[str, int]) -> BatchCounts:
    """Valid rows in the raw tables, distinct quarantined records in ops.schema_errors, against the
    records read from the file. A record is one line number of the file, so the distinct line
    numbers quarantined in any of the source's tables are its bad records."""
    tables = {}
    for spec in source.tables:
        valid = fetch_scalar(con, f"SELECT count(*) FROM {spec.qualified} WHERE partition_date = ?", [partition_date])
        rows = fetch_all(
            con,
            """SELECT rule, count(DISTINCT (line_no, record_key)) FROM ops.schema_errors
            WHERE partition_date = ? AND source = ? AND table_name = ? GROUP BY ALL ORDER BY 2 DESC, 1""",
            [partition_date, source.name, spec.name],
        )
        quarantined = fetch_scalar(
            con,
            """SELECT count(DISTINCT (line_no, record_key)) FROM ops.schema_errors
            WHERE partition_date = ? AND source = ? AND table_name = ?""",
            [partition_date, source.name, spec.name],
        )
        tables[spec.name] = TableCounts(inputs.get(spec.name, 0), int(valid), int(quarantined), dict(rows))
    bad = fetch_scalar(con, "SELECT count(DISTINCT line_no) FROM ops.schema_errors WHERE partition_date = ? AND source = ?",
                       [partition_date, source.name])
    return BatchCounts(tables, int(bad))


def check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        # Blocking: records lost or counted twice mean the partition is wrong; nothing builds on it.
        dg.AssetCheckSpec("record_accounting", asset=asset, partitions_def=daily_partitions, blocking=True,
                          description="Every input record of the partition is either valid or quarantined."),
        dg.AssetCheckSpec("error_rate", asset=asset, partitions_def=daily_partitions,
                          description="Source records with an error (the record or any part of it quarantined) "
                                      "/ input records stays within max_error_rate (default 5 %)."),
    ]


# What to check first when a rule takes the most records of a batch over the error rate: the
# rules a whole file breaks when it is written another way than the landing zone expects.
RULE_HINTS = {
    "bad_encoding": "lines that are not UTF-8: if the files are Latin-1 or cp1252, set LANDING_{SOURCE}_ENCODING",
    "_not_a_timestamp": "timestamps that are not ISO 8601: set LANDING_{SOURCE}_TIMESTAMP_FORMAT to the files' "
                        "strftime format (e.g. %m/%d/%Y %H:%M)",
    "_off_the_batch_day": "dates far from the file's day: is LANDING_{SOURCE}_TIMESTAMP_FORMAT right (day and month "
                          "swapped?), or is the file in another day's place?",
    "_after_the_batch_day": "dates after the file's day: is LANDING_{SOURCE}_TIMESTAMP_FORMAT right (day and month "
                            "swapped?), or the sender's clock?",
}


def most_broken_rule(source: Source, counts: BatchCounts) -> str:
    """The rule that quarantined the most records of the batch, with a hint when it has one."""
    by_rule: dict[str, int] = {}
    for table_counts in counts.tables.values():
        for rule, n in table_counts.by_rule.items():
            by_rule[rule] = by_rule.get(rule, 0) + n
    if not by_rule:
        return ""
    rule, n = max(by_rule.items(), key=lambda item: (item[1], item[0]))
    hint = next((text for suffix, text in RULE_HINTS.items() if rule.endswith(suffix)), None)
    return f"; most: {rule} ({n})" + (f": {hint.format(SOURCE=source.name.upper())}" if hint else "")


def check_results(source: Source, counts: BatchCounts, max_error_rate: float,
                  min_records_for_error: int = 50, asset: str | None = None) -> list[dg.AssetCheckResult]:
    """The checks' verdicts on a batch's counts, for `asset` (default: the source's raw asset)."""
    asset = asset or source.asset
    unbalanced = [t for t, c in counts.tables.items() if not c.reconciles]
    accounting = {t: {"input": c.input_records, "valid": c.valid_records, "quarantined": c.quarantined_records}
                  for t, c in counts.tables.items()}
    too_high = counts.error_rate > max_error_rate  # judged per source record; a part's own rate is reported
    records = counts.primary.input_records
    small = records < min_records_for_error  # a breach in a handful of records is a warning
    described = (f"{counts.bad_records} of {records} {source.name} records bad: "
                 + ", ".join(f"{name} {rate:.1%}" for name, rate in counts.rates.items()))
    return [
        dg.AssetCheckResult(
            asset_key=asset, check_name="record_accounting", passed=not unbalanced,
            severity=dg.AssetCheckSeverity.ERROR,
            description="input = valid + quarantined for every table" if not unbalanced
            else f"records lost or counted twice in {unbalanced}",
            metadata={"accounting": accounting},
        ),
        dg.AssetCheckResult(
            asset_key=asset, check_name="error_rate", passed=not too_high,
            severity=dg.AssetCheckSeverity.WARN if small else dg.AssetCheckSeverity.ERROR,
            description=(f"above {max_error_rate:.1%}" if too_high else f"within {max_error_rate:.1%}")
            + (f" (a batch under {min_records_for_error} records: WARN)" if too_high and small else "")
            + f": {described}" + (most_broken_rule(source, counts) if too_high else ""),
            # Floats, so that the check's page plots the measured rate over the partitions.
            metadata={**{name: float(rate) for name, rate in counts.rates.items()}, "bad_records": counts.bad_records,
                      "input_records": records, "max_error_rate": float(max_error_rate),
                      # The suite checks report the same share: one incident for both (check_alerts).
                      "incident_cause": "quarantined_share"},
        ),
    ]


def batch_metadata(source: Source, day: str, path: Any, fingerprint: str, counts: BatchCounts, seconds: float,
                   skipped: bool) -> dict[str, Any]:
    primary = counts.primary
    metadata: dict[str, Any] = {
        "partition_date": day,
        "source_path": str(path),
        "fingerprint": fingerprint,
        "skipped": skipped,
        "input_records": primary.input_records,
        "valid_records": primary.valid_records,
        "quarantined_records": primary.quarantined_records,
        "bad_records": counts.bad_records,
        **counts.rates,
        "quarantined_by_rule": primary.by_rule,
        "seconds": round(seconds, 3),
        "dagster/row_count": primary.valid_records,
    }
    for table, table_counts in list(counts.tables.items())[1:]:
        metadata[f"{table}.input_records"] = table_counts.input_records
        metadata[f"{table}.valid_records"] = table_counts.valid_records
        metadata[f"{table}.quarantined_records"] = table_counts.quarantined_records
        metadata[f"{table}.quarantined_by_rule"] = table_counts.by_rule
    return metadata


def preview(con: duckdb.DuckDBPyConnection, source: Source, day: str, counts: BatchCounts, limit: int) -> str:
    """The first valid rows of each table (by line) and the quarantine by rule, as markdown."""
    parts = []
    for spec in source.tables:
        # Top rows by line number only: an ORDER BY ALL would sort millions of purchase items.
        order = "line_no, item_no" if "item_no" in spec.columns else "line_no"
        result = con.execute(
            f"SELECT * EXCLUDE (partition_date) FROM {spec.qualified} WHERE partition_date = ? "
            f"ORDER BY {order} LIMIT {int(limit)}", [day])
        parts.append(f"**{spec.qualified}** (first valid rows)\n\n"
                     + markdown_table([d[0] for d in result.description], result.fetchall()))
        rules = list(counts.tables[spec.name].by_rule.items())
        if rules:
            parts.append(f"**{spec.name}: quarantined by rule**\n\n" + markdown_table(["rule", "records"], rules))
    return "\n\n".join(parts)
