"""The day's validated recommendations, published to the lakehouse for the systems that serve
them (when a lakehouse is configured: LAKEHOUSE_CATALOG_URI or LAKEHOUSE_REST_URI).

`outputs.recommendations` in DuckDB is the current state; the lakehouse keeps one partition per
day, so a consumer on another machine reads "the recommendations of day D" from shared Iceberg
tables without touching the DuckDB file. The step copies the table to a Parquet snapshot under a
short read connection (no writer waits for the upload), then replaces the day in Iceberg in one
commit whose marker is the outputs' state version: a re-run of a published day is a skip, a
rebuilt day replaces exactly its rows. It holds no warehouse lock and no `duckdb` pool slot.
"""


import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from assets.common.current_state import read_state
from assets.common.lakehouse_stages import SERVED_TABLE
from assets.common.partitions import daily_partitions
from assets.outputs.business_rules import ACCEPTED_TABLE, STAGE as VALIDATED
from resources.lakehouse import Lakehouse
from resources.warehouse import DuckDBWarehouse, snapshot

PUBLISHED_TABLE = SERVED_TABLE  # the Iceberg table, partitioned by day
BATCH_ROWS = 500_000
PUBLISHED_MARKER_PREFIX = "validated_recommendations@"  # a day's marker: which build of the outputs it holds


@dg.asset(
    name="published_recommendations",
    partitions_def=daily_partitions,
    deps=[VALIDATED],
    group_name="outputs",
    kinds={"iceberg"},
    tags={"pii": "true"},  # customer ids
    description="The day's validated recommendations as a partition of the lakehouse table outputs.recommendations.",
)
def published_recommendations(context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse,
                              lakehouse: Lakehouse) -> dg.MaterializeResult:
    day = context.partition_key
    with warehouse.connect(read_only=True) as con:
        state = read_state(con, VALIDATED)
    if state is None or str(state.as_of) != day:
        held = "nothing" if state is None else f"day {state.as_of}"
        raise dg.Failure(f"{ACCEPTED_TABLE} holds {held}, not {day}: materialize validated_recommendations for {day} "
                         "first (the current outputs are published only under their own day)", allow_retries=False)
    fingerprint = f"{PUBLISHED_MARKER_PREFIX}{state.version}:{state.fingerprint}"  # no lake build on this backend replaces it
    if lakehouse.day_fingerprint(PUBLISHED_TABLE, day) == fingerprint:
        return skipped(day, fingerprint)
    with snapshot(warehouse, {"outputs": f"SELECT * FROM {ACCEPTED_TABLE} ORDER BY customer_id, rank"}) as taken:
        schema = pq.read_schema(taken.path("outputs"))
        written = lakehouse.write_day(
            PUBLISHED_TABLE, day, lambda: (pa.Table.from_batches([b]) for b in taken.batches("outputs", BATCH_ROWS)),
            fingerprint, schema=schema)
    context.log.info(f"published {written.rows:,} recommendations of {day} to {PUBLISHED_TABLE} "
                     f"({written.attempts} commit attempt(s))")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": written.rows,
        "table": PUBLISHED_TABLE,
        "day": day,
        "fingerprint": fingerprint,
        "skipped": written.skipped,
        "commit_attempts": written.attempts,
    })


def skipped(day: str, fingerprint: str) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"table": PUBLISHED_TABLE, "day": day, "fingerprint": fingerprint,
                                          "skipped": True, "commit_attempts": 0})
