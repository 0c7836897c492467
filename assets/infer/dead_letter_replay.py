"""`replay_dead_letters`: re-process the open rows of the dead-letter queue, selected by stage,
reason class and partition range, as of the current state.

Product texts are read from the current `analytics.dim_products` (never an old day's catalog):
an item that is still in the catalog is embedded again through the model resource and its cache,
so a success closes its rows in every partition and a new failure adds to their attempts; an
item that left the catalog is superseded. The vectors land in the cache; the next build of
`product_embeddings` (whose last build was recorded incomplete, so it does build) takes them
from there without a model call and records a complete build.

Rows of the other stages (`recommendations`, `segment_names`) are not model items that can be
re-sent alone: their stage's next build processes them again (it is recorded incomplete while
they are open); the job reports them. Running the job twice changes nothing the second time:
what succeeded is closed, and what is still open was just retried.
"""


import dagster as dg
from pydantic import Field

from assets.infer.embeddings import PRODUCT_TEXT_SQL
from assets.infer.embeddings import STAGE as EMBEDDING_STAGE
from resources import dead_letters
from resources.dead_letters import REASON_CLASSES
from resources.model_clients import EmbeddingModel
from resources.warehouse import DuckDBWarehouse, fetch_all

REPLAY_PARTITION = "replay"  # the item map of a replay run, apart from the stage's own runs


class ReplayConfig(dg.Config):
    stages: list[str] = Field(default_factory=list, description="Stages to replay; empty: every stage.")
    reasons: list[str] = Field(default_factory=list, description=f"Reason classes; empty: all of {list(REASON_CLASSES)}.")
    first_partition: str = Field(default="", description="Oldest partition (YYYY-MM-DD) whose rows are replayed; empty: any.")
    last_partition: str = Field(default="", description="Newest partition whose rows are replayed; empty: any.")


def selected_rows(warehouse: DuckDBWarehouse, config: ReplayConfig) -> dict[str, list[str]]:
    """{stage: item keys} of the open rows the selection matches."""
    with warehouse.transaction() as con:
        dead_letters.ensure_table(con)
        rows = fetch_all(
            con,
            f"""SELECT stage, list(DISTINCT item_key ORDER BY item_key) FROM {dead_letters.TABLE}
                WHERE resolved_at IS NULL
                  AND (len($stages) = 0 OR list_contains($stages, stage))
                  AND (len($reasons) = 0 OR list_contains($reasons, reason_class))
                  AND ($first = '' OR partition_key >= $first) AND ($last = '' OR partition_key <= $last)
                GROUP BY stage ORDER BY stage""",
            {"stages": config.stages, "reasons": config.reasons, "first": config.first_partition,
             "last": config.last_partition},
        )
    return dict(rows)


def replay_embeddings(context: dg.OpExecutionContext, warehouse: DuckDBWarehouse, embedding_model: EmbeddingModel,
                      keys: list[str]) -> dict[str, int]:
    """Embed the selected products again from today's catalog; supersede those that left it."""
    with warehouse.transaction() as con:
        con.execute("CREATE OR REPLACE TEMP TABLE replay_keys AS SELECT unnest($keys::VARCHAR[]) AS item_key", {"keys": keys})
        texts = fetch_all(con, f"SELECT product_id, text FROM ({PRODUCT_TEXT_SQL}) "
                               "WHERE text <> '' AND product_id IN (SELECT item_key FROM replay_keys)")
        present = {product_id for product_id, _ in texts}
        gone = [key for key in keys if key not in present]
        superseded = dead_letters.resolve(con, EMBEDDING_STAGE, "SELECT unnest($gone::VARCHAR[])", {"gone": gone},
                                          resolution=dead_letters.SUPERSEDED) if gone else 0
    # No warehouse connection is open here: embed_items takes short ones around each model call.
    with embedding_model.open(context) as embedder:
        report = embedder.embed_items(warehouse, texts, stage=EMBEDDING_STAGE, partition_key=REPLAY_PARTITION)
    return {"selected": len(keys), "resolved": report.dead_letters_resolved, "failed_again": report.dlq_count,
            "superseded": superseded, "model_calls": report.metrics.requests}


@dg.op(required_resource_keys={"warehouse", "embedding_model"})
def replay_open_dead_letters(context: dg.OpExecutionContext, config: ReplayConfig) -> dg.Output:
    warehouse: DuckDBWarehouse = context.resources.warehouse
    selection = selected_rows(warehouse, config)
    outcome: dict[str, dict[str, int]] = {}
    for stage, keys in selection.items():
        if stage == EMBEDDING_STAGE:
            outcome[stage] = replay_embeddings(context, warehouse, context.resources.embedding_model, keys)
            context.log.info(f"{stage}: {outcome[stage]}; its next build takes the new vectors from the cache")
        else:
            outcome[stage] = {"selected": len(keys), "left_to_the_next_build": len(keys)}
            context.log.info(f"{stage}: {len(keys)} open rows; the stage's next build processes them again")
    with warehouse.connect(read_only=True) as con:
        still_open = {stage: dead_letters.count_open(con, stage) for stage in selection}
    failed = sum(o.get("failed_again", 0) for o in outcome.values())
    return dg.Output(None, metadata={
        "selection": dg.MetadataValue.json(config.model_dump()),
        "by_stage": dg.MetadataValue.json(outcome),
        "still_open": dg.MetadataValue.json(still_open),
        "resolved": sum(o.get("resolved", 0) + o.get("superseded", 0) for o in outcome.values()),
        "failed_again": failed,
    })


@dg.job(description="Re-process the open dead letters selected by stage, reason class and partition range, "
                    "as of the current state (assets/infer/dead_letter_replay.py).")
def replay_dead_letters() -> None:
    replay_open_dead_letters()
