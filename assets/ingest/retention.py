"""Retention of quarantined raw text: personal data is kept in the warehouse only as long as it is
useful to fix a bad batch.

`ops.schema_errors` keeps, per quarantined record and broken rule, the record's raw text and the
offending value, both of which may hold personal data (an email that broke the email rule).
`purge_quarantined_raw_text` blanks them once older than `retention_days` (detected before then);
the rows stay, with their partition, source, rule, column and line number, so counts and the
history of what broke which rule never change.
"""

import datetime as dt
import os

import dagster as dg
from pydantic import Field

from resources.warehouse import DuckDBWarehouse, fetch_all, table_exists

DEFAULT_RETENTION_DAYS = int(os.getenv("QUARANTINE_RAW_TEXT_RETENTION_DAYS", "90"))


class RetentionConfig(dg.Config):
    retention_days: int = Field(
        default=DEFAULT_RETENTION_DAYS, ge=0,
        description="Quarantined raw text and values older than this many days are blanked "
                    "(QUARANTINE_RAW_TEXT_RETENTION_DAYS).")


def purge_raw_text(warehouse: DuckDBWarehouse, retention_days: int, now: dt.datetime | None = None) -> int:
    """Blank `raw_record` and `value` of the quarantine rows detected more than `retention_days`
    ago; returns how many rows were purged."""
    cutoff = (now or dt.datetime.now(dt.UTC).replace(tzinfo=None)) - dt.timedelta(days=retention_days)
    with warehouse.transaction() as con:
        if not table_exists(con, "ops.schema_errors"):
            return 0
        purged = fetch_all(
            con,
            """UPDATE ops.schema_errors SET raw_record = NULL, value = NULL
               WHERE detected_at < ? AND (raw_record IS NOT NULL OR value IS NOT NULL)
               RETURNING 1""",
            [cutoff],
        )
    return len(purged)


@dg.op(required_resource_keys={"warehouse"})
def purge_old_quarantined_raw_text(context: dg.OpExecutionContext, config: RetentionConfig) -> dg.Output:
    purged = purge_raw_text(context.resources.warehouse, config.retention_days)
    context.log.info(f"purged the raw text of {purged:,} quarantine rows older than {config.retention_days} days")
    return dg.Output(None, metadata={"purged_rows": purged, "retention_days": config.retention_days})


@dg.job(description="Blank quarantined raw text and values older than the retention (default 90 days).")
def purge_quarantined_raw_text() -> None:
    purge_old_quarantined_raw_text()


purge_schedule = dg.ScheduleDefinition(
    job=purge_quarantined_raw_text, cron_schedule="30 3 * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: a retention that does not run by itself is not a retention.",
)
