"""Retention of quarantined raw text: personal data is kept in the warehouse only as long as it is
useful to fix a bad batch.

`ops.schema_errors` keeps, per quarantined record and broken rule, the record's raw text and the
offending value, both of which may hold personal data (an email that broke the email rule).
`purge_quarantined_raw_text` blanks them once older than `retention_days` (detected before then);
the rows stay, with their partition, source, rule, column and line number, so counts and the
history of what broke which rule never change. With a lakehouse configured, the job purges
its `ops.schema_errors` too, and deletes the Iceberg files that held the text.
"""

import datetime as dt
import os

import dagster as dg
from pydantic import Field

from resources.lakehouse import Lakehouse
from resources.warehouse import DuckDBWarehouse, fetch_all, table_exists

DEFAULT_RETENTION_DAYS = int(os.getenv("QUARANTINE_RAW_TEXT_RETENTION_DAYS", "90"))
PURGED_COLUMNS = ("raw_record", "value")


class RetentionConfig(dg.Config):
    retention_days: int = Field(
        default=DEFAULT_RETENTION_DAYS, ge=0,
        description="Quarantined raw text and values older than this many days are blanked "
                    "(QUARANTINE_RAW_TEXT_RETENTION_DAYS).")


def retention_cutoff(retention_days: int, now: dt.datetime | None = None) -> dt.datetime:
    return (now or dt.datetime.now(dt.UTC).replace(tzinfo=None)) - dt.timedelta(days=retention_days)


def purge_raw_text(warehouse: DuckDBWarehouse, retention_days: int, now: dt.datetime | None = None) -> int:
    """Blank `raw_record` and `value` of the quarantine rows detected more than `retention_days`
    ago; returns how many rows were purged."""
    with warehouse.transaction() as con:
        if not table_exists(con, "ops.schema_errors"):
            return 0
        purged = fetch_all(
            con,
            """UPDATE ops.schema_errors SET raw_record = NULL, value = NULL
               WHERE detected_at < ? AND (raw_record IS NOT NULL OR value IS NOT NULL)
               RETURNING 1""",
            [retention_cutoff(retention_days, now)],
        )
    return len(purged)


def purge_lake_raw_text(lakehouse: Lakehouse, retention_days: int, now: dt.datetime | None = None) -> int:
    """The same on the lakehouse's `ops.schema_errors`; the Iceberg history that still holds the
    text is expired and its files deleted, or the purge would only hide it."""
    return lakehouse.blank_old_values("ops.schema_errors", PURGED_COLUMNS, "detected_at",
                                      retention_cutoff(retention_days, now))


def build_purge_job(with_lakehouse: bool) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The purge job (the lakehouse's quarantine too, when one is configured) and its daily schedule."""

    @dg.op(name="purge_old_quarantined_raw_text",
           required_resource_keys={"warehouse", *(["lakehouse"] if with_lakehouse else [])})
    def purge_old_quarantined_raw_text(context: dg.OpExecutionContext, config: RetentionConfig) -> dg.Output:
        metadata = {"purged_rows": purge_raw_text(context.resources.warehouse, config.retention_days),
                    "retention_days": config.retention_days}
        if with_lakehouse:
            metadata["purged_rows_on_lakehouse"] = purge_lake_raw_text(context.resources.lakehouse,
                                                                       config.retention_days)
        context.log.info(f"purged the raw text of quarantine rows older than {config.retention_days} days: {metadata}")
        return dg.Output(None, metadata=metadata)

    @dg.job(name="purge_quarantined_raw_text",
            description="Blank quarantined raw text and values older than the retention (default 90 days).")
    def purge_quarantined_raw_text() -> None:
        purge_old_quarantined_raw_text()

    schedule = dg.ScheduleDefinition(
        job=purge_quarantined_raw_text, cron_schedule="30 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Daily: a retention that does not run by itself is not a retention.",
    )
    return purge_quarantined_raw_text, schedule
