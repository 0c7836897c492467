"""Honest outcomes: a run is red when a stage failed, a wrong key or model is a clear failure
that blames no item, and a failed check stays failed (and blocks what builds on it) until fixed.
Real runs against the fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import dagster as dg
import pytest

from assets.evaluate import quality as quality_module
from assets.evaluate.quality import recommendation_quality
from assets.infer.embeddings import PRODUCT_TEXT_SQL, product_embeddings
from assets.infer.segments import customer_segments
from assets.ingest import raw_assets
from resources.model_clients import ChatModel, EmbeddingModel
from resources.warehouse import fetch_all, fetch_scalar
from tests.fake_openai_server import RATE_LIMIT, UNAVAILABLE, FakeOpenAIServer
from tests.ingestion_support import RAW, day, generate_landing, raw_resources
from tests.test_ai_assets import base_warehouse, checks_of, metadata_of, resources, run, server  # noqa: F401

ONLY_WAREHOUSE_SPLIT = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": ""}}}}


def replay_metadata(result: dg.ExecuteInProcessResult) -> dict:
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


def embedding_model(base_url: str, key: str, model: str = "fake-embed") -> EmbeddingModel:
    return EmbeddingModel(provider="openai", model=model, dimensions=384, base_url=base_url, api_key=key,
                          max_concurrency=2, backoff_base_seconds=0.01)


def test_a_wrong_key_or_model_is_red_blames_no_item_and_a_fixed_rerun_embeds_everything(resources):
    warehouse = resources["warehouse"]
    with FakeOpenAIServer(api_key="right-key", models={"fake-embed"}) as strict:
        for key, model, status in (("wrong-key", "fake-embed", "401"), ("right-key", "no-such-model", "404")):
            result = run([product_embeddings], {**resources, "embedding_model": embedding_model(strict.base_url, key, model)},
                         raise_on_error=False)
            assert not result.success
            message = failure_message(result)
            assert f"HTTP {status}" in message and "Nothing was dead-lettered" in message
            assert ("OPENAI_API_KEY" if status == "401" else "EMBEDDING_MODEL") in message
            assert "wrong-key" not in message
        with warehouse.connect(read_only=True) as con:
            assert fetch_scalar(con, "SELECT count(*) FROM ops.dead_letter") == 0
        fixed = run([product_embeddings], {**resources, "embedding_model": embedding_model(strict.base_url, "right-key")})
    meta = metadata_of(fixed, "product_embeddings")
    assert meta["skipped"] is False and meta["dagster/row_count"] == meta["products"] - meta["products_without_text"] > 0
    assert checks_of(fixed)["products_embedded"].passed and checks_of(fixed)["dead_letter_share"].passed


def test_a_wrong_chat_key_fails_the_segments_and_dead_letters_nothing(resources):
    assert run([product_embeddings], resources).success
    with FakeOpenAIServer(api_key="right-key") as strict:
        chat = ChatModel(provider="openai", model="fake-chat", base_url=strict.base_url, api_key="wrong-key")
        result = run([customer_segments], {**resources, "chat_model": chat}, raise_on_error=False)
    assert not result.success and "OPENAI_API_KEY" in failure_message(result)
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.dead_letter") == 0


def test_a_failed_evaluation_stays_failed_on_the_skipped_rerun(resources, monkeypatch):
    defs_assets = [product_embeddings, customer_segments]
    assert run(defs_assets, resources).success
    from assets.infer.recommendations import recommendations

    assert run([recommendations], resources).success
    losing = {"lift": 0.5, "best_baseline": "segment popularity", "ours": 0.2, "baseline": 0.4, "noise_margin": 0.05,
              "worse_beyond_noise": True, "model": "ease"}
    monkeypatch.setattr(quality_module, "versus_best_baseline", lambda report: losing)  # a baseline wins, this once
    first = run([recommendation_quality], resources, ONLY_WAREHOUSE_SPLIT)
    assert not checks_of(first)["beats_best_baseline"].passed
    monkeypatch.undo()
    again = run([recommendation_quality], resources, ONLY_WAREHOUSE_SPLIT)
    assert metadata_of(again, "recommendation_quality")["skipped"] is True
    check = checks_of(again)["beats_best_baseline"]
    assert not check.passed and check.metadata["versus_best_baseline"].value == {"warehouse": losing}


def test_an_evaluation_dataset_path_that_is_wrong_is_red_not_quietly_skipped(resources, tmp_path):
    assert run([product_embeddings, customer_segments], resources).success
    wrong = {"ops": {"recommendation_quality": {"config": {"online_retail_dir": str(tmp_path / "no-such-folder")}}}}
    result = run([recommendation_quality], resources, wrong, raise_on_error=False)
    assert not result.success and "no-such-folder is not a folder" in failure_message(result)


def test_an_unreconciled_batch_is_red_and_blocks_what_builds_on_it(warehouse, tmp_path, monkeypatch):
    from definitions import defs

    landing = generate_landing(tmp_path / "landing", customers=50, days=1)
    original = raw_assets.insert_partition

    def losing_one_row(con, source, partition_date):  # a bug that drops a valid row
        original(con, source, partition_date)
        con.execute("DELETE FROM raw.transactions WHERE line_no = (SELECT min(line_no) FROM raw.transactions)")

    monkeypatch.setattr(raw_assets, "insert_partition", losing_one_row)
    selected = [RAW["raw_transactions"], defs.get_assets_def(dg.AssetKey("stg_order_lines"))]
    result = dg.materialize(selected, partition_key=day(0), resources=raw_resources(warehouse, landing),
                            raise_on_error=False)
    assert not result.success
    assert not checks_of(result)["record_accounting"].passed
    assert "stg_order_lines" not in {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    # The skip that follows recounts from the tables: still red, still blocking.
    monkeypatch.undo()
    again = dg.materialize(selected, partition_key=day(0), resources=raw_resources(warehouse, landing),
                           raise_on_error=False)
    assert not again.success and not checks_of(again)["record_accounting"].passed
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'stg_order_lines'") == [(0,)]


@pytest.mark.parametrize("selection, message", [
    ({"stages": ["recomendations"]}, "unknown stages ['recomendations']"),
    ({"reasons": ["timed_out"]}, "unknown reason classes ['timed_out']"),
    ({"first_partition": "2011-9-1"}, "first_partition '2011-9-1' is not a day written YYYY-MM-DD"),
    ({"first_partition": "2011-09-03", "last_partition": "2011-09-01"}, "is after last_partition"),
])
def test_a_replay_whose_selection_cannot_match_is_red_not_an_empty_green(resources, selection, message):
    """Compared as text, a misspelt stage, reason or day selected nothing: a green replay that did nothing."""
    from definitions import defs

    config = {"ops": {"replay_open_dead_letters": {"config": selection}}}
    result = defs.resolve_job_def("replay_dead_letters").execute_in_process(run_config=config, resources=resources,
                                                                           raise_on_error=False)
    assert not result.success and message in failure_message(result)


def test_replay_drains_a_dead_letter_queue_spread_over_three_days(resources, server):
    """Three days of builds leave failed products in the DLQ (a different product each day, all
    still failing): a replay while the model still fails them is red and keeps every row; once it
    recovers the replay, as of today's catalog, closes every row in every partition,
    honours its reason filter, changes nothing when run twice, and the next build is complete
    without a model call."""
    from definitions import defs

    warehouse = resources["warehouse"]
    with warehouse.connect(read_only=True) as con:
        texts = [row[0] for row in fetch_all(con, f"SELECT text FROM ({PRODUCT_TEXT_SQL}) WHERE text <> '' LIMIT 3")]
    for number, text in enumerate(texts):  # the whole text: a marker only these requests carry
        server.poison[text] = UNAVAILABLE if number < 2 else RATE_LIMIT
    flaky = {**resources, "embedding_model": EmbeddingModel(
        provider="openai", model="fake-embed", dimensions=384, base_url=server.base_url, api_key="test-key",
        max_batch_size=1, max_concurrency=2, max_attempts=2, max_retry_after_seconds=0.0, backoff_base_seconds=0.01)}
    for day in ("2011-09-01", "2011-09-02", "2011-09-03"):
        dg.materialize([product_embeddings], partition_key=day, resources=flaky, raise_on_error=False)
    with warehouse.connect(read_only=True) as con:
        open_rows = fetch_all(con, "SELECT partition_key, reason_class FROM ops.dead_letter WHERE resolved_at IS NULL")
    assert sorted(open_rows) == sorted([(day, reason) for day in ("2011-09-01", "2011-09-02", "2011-09-03")
                                        for reason in ("server_error", "server_error", "rate_limited")])
    replay = defs.resolve_job_def("replay_dead_letters")
    still_failing = replay.execute_in_process(resources=flaky, raise_on_error=False)  # the model is still down
    assert not still_failing.success  # a replay that drained nothing is not green
    assert "3 of the selected items failed again" in failure_message(still_failing)
    with warehouse.connect(read_only=True) as con:  # the days' rows, and the replay's failures with their reason
        assert sorted(fetch_all(con, "SELECT partition_key, reason_class FROM ops.dead_letter WHERE resolved_at IS "
                                     "NULL")) == sorted(open_rows + [("replay", "server_error")] * 2
                                                        + [("replay", "rate_limited")])
    server.poison.clear()

    config = {"ops": {"replay_open_dead_letters": {"config": {"reasons": ["server_error"]}}}}
    first = replay.execute_in_process(run_config=config, resources=flaky)
    with warehouse.connect(read_only=True) as con:
        left = fetch_all(con, "SELECT DISTINCT reason_class FROM ops.dead_letter WHERE resolved_at IS NULL")
        resolved = fetch_scalar(con, "SELECT count(*) FROM ops.dead_letter WHERE resolution = 'succeeded'")
    assert left == [("rate_limited",)] and resolved == 8  # 2 products x (3 days + replay); not the 429s
    assert replay_metadata(first)["resolved"] == 8
    assert replay_metadata(replay.execute_in_process(resources=flaky))["resolved"] == 4
    again = replay_metadata(replay.execute_in_process(resources=flaky))
    assert again["resolved"] == 0 and again["by_stage"] == {}
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.dead_letter WHERE resolved_at IS NULL") == 0
    server.reset_stats()
    complete = dg.materialize([product_embeddings], partition_key="2011-09-03", resources=resources, raise_on_error=False)
    assert complete.success and server.stats.requests == 0
    assert metadata_of(complete, "product_embeddings")["skipped"] is False  # the incomplete build is rebuilt
    assert checks_of(complete)["products_embedded"].passed
