"""`replay_dead_letters`: re-process the open rows of the dead-letter queue, selected by stage,
reason class and partition range, as of the current state.

Product texts are read from the current `analytics.dim_products` (never an old day's catalog):
an item that is still in the catalog is embedded again through the model resource and its cache,
so a success closes its rows in every partition and a new failure is recorded with its reason
under the partition `replay` (the job is then red: the queue is not drained); an item that left
the catalog is superseded. The vectors land in the cache; the next build of
`product_embeddings` (whose last build was recorded incomplete, so it does build) takes them
from there without a model call and records a complete build.

Rows of the other stages (`recommendations`, `segment_names`) are not model items that can be
re-sent alone: their stage's next build processes them again (it is recorded incomplete while
they are open); the job reports them. Running the job twice changes nothing the second time:
what succeeded is closed, and what is still open was just retried.

On the lakehouse backend (PIPELINE_BACKEND=lakehouse) the queue is on the lake: each stage's
open rows are those its latest build left there. The job selects among them the same way and
embeds the selected products again from the lake's current `dim_products`, on a private DuckDB
filled from the lake. The new vectors go to the lake's model cache as a share of their own; the
rows themselves belong to the stage's builds, so the next build of `lake_product_embeddings`
(the next daily run, or a re-run of its latest day) takes the vectors without a model call and
closes them (or supersedes an item that left the catalog). The job reports what that build will
find; it does not rewrite a build's rows, which a build running meanwhile could be writing.
"""


import tempfile
import uuid
from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.common.current_state import dead_letter_stages, stage_names
from assets.common.lakehouse_stages import (
    CACHE_ADDITIONS,
    FAR_FUTURE,
    hydrate_cache,
    hydrate_ledger,
    hydrate_stage_rows,
    hydrate_tables,
    latest_states,
    private_warehouse,
    stages_of,
    ledger_keeper,
    write_cache_additions,
)
from assets.infer.embeddings import PRODUCT_TEXT_SQL
from assets.infer.embeddings import STAGE as EMBEDDING_STAGE
from resources import dead_letters
from resources.dead_letters import REASON_CLASSES
from resources.lakehouse import Lakehouse
from resources.landing import is_iso_day
from resources.model_clients import EmbeddingModel, batch_api
from resources.model_clients.texts import prepare_text
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar

REPLAY_PARTITION = "replay"  # the item map of a replay run, apart from the stage's own runs


class ReplayConfig(dg.Config):
    stages: list[str] = Field(default_factory=list, description="Stages to replay; empty: every stage.")
    reasons: list[str] = Field(default_factory=list, description=f"Reason classes; empty: all of {list(REASON_CLASSES)}.")
    first_partition: str = Field(default="", description="Oldest partition (YYYY-MM-DD) whose rows are replayed; empty: any.")
    last_partition: str = Field(default="", description="Newest partition whose rows are replayed; empty: any.")


def refuse_a_selection_that_cannot_match(config: ReplayConfig) -> None:
    """A misspelt stage or reason class, or a day not written YYYY-MM-DD (compared as text), would
    select nothing, and the replay would be green having done nothing."""
    problems = []
    if unknown := sorted(set(config.stages) - set(dead_letter_stages())):
        problems.append(f"unknown stages {unknown} (the stages that dead-letter: {dead_letter_stages()})")
    if unknown := sorted(set(config.reasons) - set(REASON_CLASSES)):
        problems.append(f"unknown reason classes {unknown} (they are {list(REASON_CLASSES)})")
    for name in ("first_partition", "last_partition"):
        value = getattr(config, name)
        if value and not is_iso_day(value):
            problems.append(f"{name} {value!r} is not a day written YYYY-MM-DD")
    if config.first_partition and config.last_partition and config.first_partition > config.last_partition:
        problems.append(f"first_partition {config.first_partition} is after last_partition {config.last_partition}")
    if problems:
        raise dg.Failure("the replay's selection cannot match: " + "; ".join(problems), allow_retries=False)


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
            "superseded": superseded, "left_the_catalog": len(gone), "model_calls": report.metrics.requests}


def replay_on_warehouse(context: dg.OpExecutionContext, config: ReplayConfig) -> dict:
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
    return {
        "by_stage": dg.MetadataValue.json(outcome),
        "still_open": dg.MetadataValue.json(still_open),
        "resolved": sum(o.get("resolved", 0) + o.get("superseded", 0) for o in outcome.values()),
        "failed_again": sum(o.get("failed_again", 0) for o in outcome.values()),
    }


REPLAY_WRITER = "replay_dead_letters"  # the lake cache's shares of replays: `replay_dead_letters:<run>`


def replay_on_lakehouse(context: dg.OpExecutionContext, config: ReplayConfig) -> dict:
    """The lake's open rows, selected as on the warehouse; the selected products embedded again
    into the lake's model cache, for the stage's next build (module docstring)."""
    lakehouse: Lakehouse = context.resources.lakehouse
    states = latest_states(lakehouse, FAR_FUTURE, stage_names())
    catalog = latest_states(lakehouse, FAR_FUTURE, ["dim_products"])  # an SQL model: no stage rows
    outcome: dict[str, dict] = {}
    closes_at: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lake-replay-") as folder:
        warehouse = private_warehouse(Path(folder))
        with warehouse.transaction() as con:
            dead_letters.ensure_table(con)
            hydrate_stage_rows(con, lakehouse, states, tables=[dead_letters.TABLE])
            still_open = dict(fetch_all(con, f"SELECT stage, count(*) FROM {dead_letters.TABLE} "
                                             "WHERE resolved_at IS NULL GROUP BY stage ORDER BY stage"))
        owners = {stage: name for name in states for stage in stages_of(name)}  # segment_names: segments'
        for stage, keys in selected_rows(warehouse, config).items():
            owner = owners[stage]
            day = str(states[owner]["as_of"])
            closes_at[stage] = f"the next build of lake_{owner} (a run of {day} or a later day)"
            if stage == EMBEDDING_STAGE:
                outcome[stage] = _embed_into_the_lake_cache(context, lakehouse, warehouse, keys, day, catalog)
                context.log.info(f"{stage}: {outcome[stage]}; the rows close at {closes_at[stage]}")
            else:
                outcome[stage] = {"selected": len(keys), "left_to_the_next_build": len(keys)}
                context.log.info(f"{stage}: {len(keys)} open rows; {closes_at[stage]} processes them again")
    return {
        "by_stage": dg.MetadataValue.json(outcome),
        "still_open": dg.MetadataValue.json({stage: still_open.get(stage, 0) for stage in outcome}),
        "rows_close_at": dg.MetadataValue.json(closes_at),
        "embedded_now": sum(o.get("embedded_now", 0) for o in outcome.values()),
        "failed_again": sum(o.get("failed_again", 0) for o in outcome.values()),
    }


def _embed_into_the_lake_cache(context: dg.OpExecutionContext, lakehouse: Lakehouse, warehouse: DuckDBWarehouse,
                               keys: list[str], day: str, catalog: dict) -> dict[str, int]:
    """Items counted, not rows: the lake's rows stay open until the build closes them."""
    writer = f"{REPLAY_WRITER}:{context.run_id[:8]}"
    model: EmbeddingModel = context.resources.embedding_model
    with warehouse.transaction() as con:
        hydrate_tables(con, lakehouse, catalog, only=["analytics.dim_products"])
        texts = fetch_all(con, f"SELECT text FROM ({PRODUCT_TEXT_SQL}) WHERE product_id IN (SELECT unnest($keys))",
                          {"keys": keys})
        # the cached vectors of these texts only, not the whole cache; a writer of its own: all are seen
        hydrate_cache(con, lakehouse, writer, day,
                      [prepare_text("", text, model.max_input_chars).text_hash for (text,) in texts])
        hydrate_ledger(con, lakehouse, EMBEDDING_STAGE)  # a batch still running is collected, not paid again
    # a batch this replay submits is collected by whoever runs next
    with batch_api.on_ledger_written(ledger_keeper(lakehouse, warehouse, EMBEDDING_STAGE, day, context.log)):
        replayed = replay_embeddings(context, warehouse, context.resources.embedding_model, keys)
    with warehouse.connect(read_only=True) as con:
        if fetch_scalar(con, f"SELECT count(*) FROM ({CACHE_ADDITIONS})", {"writer": writer}):
            write_cache_additions(lakehouse, con, day, writer, f"{writer}:{uuid.uuid4().hex[:12]}")
        failing = int(fetch_scalar(con, f"SELECT count(DISTINCT item_key) FROM {dead_letters.TABLE} WHERE stage = $stage "
                                        "AND resolved_at IS NULL AND item_key IN (SELECT unnest($keys))",
                                   {"stage": EMBEDDING_STAGE, "keys": keys}))
    return {"selected": len(keys), "embedded_now": len(keys) - failing - replayed["left_the_catalog"],
            "failed_again": failing, "left_the_catalog": replayed["left_the_catalog"],
            "model_calls": replayed["model_calls"]}


def build_replay_job(on_lakehouse: bool) -> dg.JobDefinition:
    """The job on the backend's queue: the warehouse's ops.dead_letter, or the lake's."""
    resources = {"lakehouse" if on_lakehouse else "warehouse", "embedding_model"}

    @dg.op(required_resource_keys=resources)
    def replay_open_dead_letters(context: dg.OpExecutionContext, config: ReplayConfig) -> dg.Output:
        refuse_a_selection_that_cannot_match(config)
        replay = replay_on_lakehouse if on_lakehouse else replay_on_warehouse
        metadata = {"selection": dg.MetadataValue.json(config.model_dump()), **replay(context, config)}
        if metadata["failed_again"]:  # green would say the queue is drained
            raise dg.Failure(f"{metadata['failed_again']} of the selected items failed again and stay in the "
                             "dead-letter queue; the others were processed (by_stage)",
                             metadata=metadata, allow_retries=False)
        return dg.Output(None, metadata=metadata)

    @dg.job(description="Re-process the open dead letters selected by stage, reason class and partition range, "
                        "as of the current state, on the pipeline's backend (assets/infer/dead_letter_replay.py).")
    def replay_dead_letters() -> None:
        replay_open_dead_letters()

    return replay_dead_letters
