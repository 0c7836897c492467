"""Bad input through the AI stages: each case has a defined outcome (skipped with a count, the
DLQ, or a clear check failure), never a crash and never a silent gap."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest

from assets.infer.embeddings import product_embeddings
from assets.infer.recommendations import recommendations
from assets.infer.segments import customer_segments
from assets.outputs.business_rules import validated_recommendations
from generator import FaultRates, GeneratorConfig, generate
from recsys.recommender import Recommender
from resources.model_clients import ChatModel
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar
from tests.fake_openai_server import NAN, FakeOpenAIServer
from tests.test_pipeline import pipeline_resources

DAY = "2011-09-01"
UPSTREAM_OF_AI = ["raw_products", "raw_customers", "raw_transactions", "stg_order_lines", "stg_customer_history", "stg_purchases",
                  "dim_products", "customer_features"]


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(default_dimensions=384) as fake:
        yield fake


@pytest.fixture(scope="module")
def base_warehouse(tmp_path_factory, server) -> tuple[Path, Path]:
    """Landed and modelled data for 600 customers, up to the AI stages."""
    from definitions import defs

    folder = tmp_path_factory.mktemp("ai")
    landing = folder / "landing"
    generate(GeneratorConfig(out=landing, customers=600, days=1, seed=5, start=dt.date(2011, 9, 1),
                             faults=FaultRates.uniform(0.0)))
    resources = pipeline_resources(folder / "base.duckdb", landing, server)
    assets = [a for a in defs.assets if a.key.to_user_string() in UPSTREAM_OF_AI]
    assert dg.materialize(assets, partition_key=DAY, resources=resources).success
    return folder / "base.duckdb", landing


@pytest.fixture
def resources(tmp_path, base_warehouse, server) -> dict:
    path = tmp_path / "warehouse.duckdb"
    shutil.copy(base_warehouse[0], path)
    server.poison.clear()
    server.chat_content = None
    return pipeline_resources(path, base_warehouse[1], server)


def run(assets, resources, run_config=None, raise_on_error=True):
    return dg.materialize(assets, partition_key=DAY, resources=resources, run_config=run_config,
                          raise_on_error=raise_on_error)


def metadata_of(result, asset: str) -> dict:
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset)
    return {k: v.value for k, v in event.materialization.metadata.items()}


def failure_of(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.error.message


def checks_of(result) -> dict:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def test_products_without_text_are_counted_and_a_garbage_vector_goes_to_the_dlq(resources, server):
    warehouse: DuckDBWarehouse = resources["warehouse"]
    with warehouse.transaction() as con:
        ids = [r[0] for r in fetch_all(con, "SELECT product_id FROM analytics.dim_products ORDER BY 1 LIMIT 2")]
        con.execute("UPDATE analytics.dim_products SET name = NULL, description = NULL, category = NULL WHERE product_id = ?", [ids[0]])
        poisoned_name = fetch_all(con, "SELECT name FROM analytics.dim_products WHERE product_id = ?", [ids[1]])[0][0]
    server.poison[poisoned_name] = NAN  # the server answers NaN for that text only
    result = run([product_embeddings], resources)
    assert result.success
    meta = metadata_of(result, "product_embeddings")
    assert meta["products_without_text"] == 1 and meta["dlq_count"] == 1
    assert not checks_of(result)["products_embedded"].passed
    with warehouse.connect(read_only=True) as con:
        dead = fetch_all(con, "SELECT item_key, reason_class FROM ops.dead_letter WHERE stage = 'product_embeddings'")
        stored = fetch_scalar(con, "SELECT count(*) FROM ml.product_embeddings")
        vectors_ok = fetch_scalar(con, "SELECT bool_and(len(vector) = 384) FROM ml.product_embeddings")
    assert dead == [(ids[1], "invalid_output")]
    assert stored == meta["products"] - 2 and vectors_ok


def test_a_dead_lettered_product_that_loses_its_text_is_superseded_not_left_open_for_ever(resources, server):
    """Such a product is no longer sent to the model, so its row could never close: every later
    build was red and rebuilt, saying "open items are retried by the next run", while nothing was
    retried (found by an outside-in probe)."""
    warehouse: DuckDBWarehouse = resources["warehouse"]
    with warehouse.connect(read_only=True) as con:
        product, name = fetch_all(con, "SELECT product_id, name FROM analytics.dim_products ORDER BY 1 LIMIT 1")[0]
    server.poison[name] = "server_error"
    strict = {"ops": {"product_embeddings": {"config": {"max_failed_share": 0.0}}}}
    assert not run([product_embeddings], resources, strict, raise_on_error=False).success
    server.poison.clear()
    with warehouse.transaction() as con:
        con.execute("UPDATE analytics.dim_products SET name = NULL, description = NULL, category = NULL "
                    "WHERE product_id = ?", [product])

    result = run([product_embeddings], resources, strict)

    assert checks_of(result)["products_embedded"].passed and checks_of(result)["dead_letter_share"].passed
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT DISTINCT resolution FROM ops.dead_letter WHERE item_key = ?", [product]) == [
            ("superseded",)]
        assert fetch_scalar(con, "SELECT count(*) FROM ops.dead_letter WHERE resolved_at IS NULL") == 0
    assert metadata_of(run([product_embeddings], resources, strict), "product_embeddings")["skipped"]


def test_a_failing_recommendation_chunk_is_dead_lettered_the_rest_goes_on_and_the_run_is_red(resources, monkeypatch):
    assert run([product_embeddings], resources).success
    original = Recommender.score_chunk

    def failing_for_one_chunk(self, chunk, candidates, **options):
        if "cursed" in chunk.customer_ids.to_pylist():
            raise FloatingPointError("injected fault")
        return original(self, chunk, candidates, **options)

    warehouse: DuckDBWarehouse = resources["warehouse"]
    with warehouse.transaction() as con:
        victim = fetch_all(con, "SELECT min(customer_id) FROM analytics.stg_purchases")[0][0]
        con.execute("UPDATE analytics.stg_purchases SET customer_id = 'cursed' WHERE customer_id = ?", [victim])
    monkeypatch.setattr(Recommender, "score_chunk", failing_for_one_chunk)
    config = {"ops": {"recommendations": {"config": {"score_chunk_customers": 50, "workers": 1}}}}
    result = run([recommendations], resources, config, raise_on_error=False)
    # 50 of 600 customers in the DLQ is over the 1 % a build may leave: the blocking check says so.
    assert not result.success
    share = checks_of(result)["dead_letter_share"]
    assert not share.passed and share.metadata["dlq_open"].value == metadata_of(result, "recommendations")["dlq_count"]
    meta = metadata_of(result, "recommendations")
    with warehouse.connect(read_only=True) as con:
        dead = fetch_all(con, "SELECT reason_class, count(*) FROM ops.dead_letter WHERE stage = 'recommendations' GROUP BY 1")
        served = fetch_scalar(con, "SELECT count(DISTINCT customer_id) FROM ml.recommendations")
        cursed = fetch_scalar(con, "SELECT count(*) FROM ml.recommendations WHERE customer_id = 'cursed'")
        customers = fetch_scalar(con, "SELECT count(DISTINCT customer_id) FROM analytics.stg_purchases")
    assert dead == [("processing_error", meta["dlq_count"])] and 0 < meta["dlq_count"] <= 50
    assert cursed == 0 and served + meta["dlq_count"] == customers
    # A later run of the outputs alone must not serve the gap green (it did; found by a probe).
    outputs = run([validated_recommendations], resources, raise_on_error=False)
    assert not outputs.success
    assert "recommendations (" in failure_of(outputs) and "failed blocking checks ['dead_letter_share']" in failure_of(outputs)


def test_a_catalog_with_nothing_in_stock_serves_nobody_and_says_why(resources):
    assert run([product_embeddings], resources).success
    with resources["warehouse"].transaction() as con:
        con.execute("UPDATE analytics.dim_products SET in_stock = false")
    result = run([recommendations], resources)
    assert result.success
    check = checks_of(result)["customers_served"]
    assert not check.passed and "no in-stock candidate products" in check.description
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ml.recommendations") == 0
        assert fetch_all(con, "SELECT DISTINCT reason FROM ml.recommendation_skips") == [("no in-stock candidate products",)]


def chat_resources(resources, server, max_attempts: int = 1) -> dict:
    return {**resources, "chat_model": ChatModel(provider="openai", model="fake-chat", base_url=server.base_url,
                                                  api_key="test-key", max_attempts=max_attempts,
                                                  backoff_base_seconds=0.01)}


def name_every_segment(texts):
    ids = sorted(set(re.findall(r'"segment_id": "(\d+)"', " ".join(texts))))
    return json.dumps({i: f"Tribe {i}" for i in ids})


def test_a_garbage_segment_naming_answer_falls_back_is_dead_lettered_and_retried(resources, server):
    assert run([product_embeddings], resources).success
    chatty = chat_resources(resources, server, max_attempts=3)
    result = run([customer_segments], chatty, raise_on_error=False)  # the fake answers off-topic JSON
    assert not result.success and not checks_of(result)["dead_letter_share"].passed
    assert metadata_of(result, "customer_segments")["named_by"].startswith("profile (chat answer rejected")
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_all(con, "SELECT reason_class, attempts FROM ops.dead_letter WHERE stage = 'segment_names'") == [
            ("invalid_output", 3)]
        assert fetch_scalar(con, "SELECT bool_and(named_by = 'profile') FROM ml.segment_profiles")
    # Not an unchanged success: the next plain run asks again, and a good answer closes the row.
    server.chat_content = name_every_segment
    again = run([customer_segments], chatty)
    assert metadata_of(again, "customer_segments")["named_by"] == "chat"
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_all(con, "SELECT resolution FROM ops.dead_letter WHERE stage = 'segment_names'") == [("succeeded",)]


def test_a_naming_dead_letter_closes_when_the_chat_model_is_turned_off(resources, server):
    """With no chat model the naming request is never made again: its open row kept every build
    red ("1 of 0 items in the dead-letter queue") and rebuilding for ever (found by a probe)."""
    assert run([product_embeddings], resources).success
    assert not run([customer_segments], chat_resources(resources, server, max_attempts=1), raise_on_error=False).success

    result = run([customer_segments], {**resources, "chat_model": ChatModel(provider="none")})

    assert checks_of(result)["dead_letter_share"].passed
    assert metadata_of(result, "customer_segments")["named_by"] == "profile (no chat model configured)"
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_all(con, "SELECT resolution FROM ops.dead_letter WHERE stage = 'segment_names'") == [("superseded",)]


def test_segment_names_come_from_the_chat_model_when_its_answer_is_valid(resources, server):
    server.chat_content = name_every_segment
    assert run([product_embeddings], resources).success
    result = run([customer_segments], chat_resources(resources, server))
    assert result.success
    assert metadata_of(result, "customer_segments")["named_by"] == "chat"
    with resources["warehouse"].connect(read_only=True) as con:
        names = fetch_all(con, "SELECT segment_id, name, named_by FROM ml.segment_profiles ORDER BY 1")
    assert names and all(name == f"Tribe {sid}" and by == "chat" for sid, name, by in names)


def test_customers_without_embedded_products_are_skipped_and_counted(resources):
    assert run([product_embeddings], resources).success
    with resources["warehouse"].transaction() as con:
        lonely = fetch_all(con, "SELECT min(customer_id) FROM analytics.stg_purchases")[0][0]
        con.execute("UPDATE analytics.stg_purchases SET product_id = 'NO-VECTOR' WHERE customer_id = ?", [lonely])
    result = run([customer_segments], resources)
    assert result.success
    skipped = metadata_of(result, "customer_segments")["customers_skipped"]
    assert skipped["no_embedded_products"] == 1
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ml.customer_segments WHERE customer_id = ?", [lonely]) == 0


@pytest.mark.parametrize("stage", ["recommendations", "customer_segments"])
def test_an_alert_row_is_written_while_a_model_stage_computes(resources, monkeypatch, stage):
    """The model stages compute from a snapshot: while they fit and score, no warehouse lock is
    held, so an alert (or another partition's write) is not queued behind them."""
    import assets.infer.segments as segments_module
    from tests.lock_support import Pause, alert_written_while

    assert run([product_embeddings], resources).success
    pause = Pause()
    if stage == "recommendations":
        monkeypatch.setattr(Recommender, "score_chunk", pause.before(Recommender.score_chunk))
        asset = recommendations
    else:
        monkeypatch.setattr(segments_module, "fit_segments", pause.before(segments_module.fit_segments))
        asset = customer_segments
    result = alert_written_while(resources["warehouse"], lambda: run([asset], resources, raise_on_error=False),
                                 pause, f"{stage} computes")
    assert result.success


def test_recommendations_deploy_the_selected_model_and_show_the_candidates(resources):
    from recsys.selection import CANDIDATES

    assert run([product_embeddings], resources).success
    meta = metadata_of(run([recommendations], resources), "recommendations")
    table = meta["model_selection_table"]
    candidates = {row["candidate"] for row in table}
    # the product vectors add the collaborative winner once more, with text neighbours
    assert set(CANDIDATES) <= candidates and all(c.endswith(" + text neighbours") for c in candidates - set(CANDIDATES))
    deployed = [row["candidate"] for row in table if row["deployed"]]
    assert deployed == [meta["deployed_model"]] and "chosen" in meta["model_selection"]
    judged = [row["hit_rate"] for row in table if row["hit_rate"] is not None]
    assert next(row for row in table if row["deployed"])["hit_rate"] == max(judged)
    with resources["warehouse"].connect(read_only=True) as con:
        strategies = {s for (s,) in fetch_all(con, "SELECT DISTINCT strategy FROM ml.recommendations")}
    collaborative_model = CANDIDATES[meta["deployed_model"].removesuffix(" + text neighbours")]["model"] in ("ease", "item_knn")
    assert ("collaborative" in strategies) == collaborative_model


def test_without_product_categories_segments_are_named_after_topics_of_the_product_text(resources):
    """A shop whose only source is its order lines (Online Retail) has no categories: they are
    inferred from the product text vectors, and segment names say what the segments buy."""
    assert run([product_embeddings], resources).success
    with resources["warehouse"].transaction() as con:
        con.execute("UPDATE analytics.dim_products SET category = 'uncategorized'")
        products = fetch_scalar(con, "SELECT count(*) FROM ml.product_embeddings")
    meta = metadata_of(run([customer_segments], resources), "customer_segments")
    assert 0 < meta["products_with_inferred_category"] <= products
    with resources["warehouse"].connect(read_only=True) as con:
        names = [n for (n,) in fetch_all(con, "SELECT name FROM ml.segment_profiles")]
        categories = [json.loads(c) for (c,) in fetch_all(con, "SELECT top_categories FROM ml.segment_profiles")]
    assert len(names) == len(set(names)) >= 2
    assert not any(name.startswith("Segment ") for name in names), names
    assert not any("uncategorized" in str(c) for c in categories)


def test_predicted_value_carries_its_currency_and_sources_in_two_currencies_fail(resources, monkeypatch):
    monkeypatch.setenv("PIPELINE_CURRENCY", "EUR")
    assert run([product_embeddings], resources).success
    meta = metadata_of(run([recommendations], resources), "recommendations")
    with resources["warehouse"].connect(read_only=True) as con:
        currencies = fetch_all(con, "SELECT DISTINCT currency FROM ml.recommendations")
    assert meta["currency"] == "EUR" and currencies == [("EUR",)]
    monkeypatch.setenv("TRANSACTIONS_CURRENCY", "USD")  # one source says otherwise: amounts cannot be summed
    result = run([recommendations], resources, raise_on_error=False)
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert not result.success and "different currencies" in message and "transactions: USD" in message
    with resources["warehouse"].connect(read_only=True) as con:
        assert fetch_all(con, "SELECT DISTINCT currency FROM ml.recommendations") == [("EUR",)]  # left as it was


def test_a_product_outside_the_model_is_recommended_through_its_text_twin(resources):
    """Just outside a 20-item model, a product has no collaborative signal; given the text (so the
    vector) of a product just inside that sells about as well, it reaches customers through that
    product, and is counted."""
    buyers = """SELECT product_id, count(DISTINCT customer_id) AS n, bool_or(in_stock) AS in_stock
                FROM analytics.stg_purchases JOIN analytics.dim_products USING (product_id) GROUP BY product_id"""
    with resources["warehouse"].transaction() as con:
        [(twentieth,)] = fetch_all(con, f"SELECT n FROM ({buyers}) ORDER BY n DESC LIMIT 1 OFFSET 19")
        [(twin,)] = fetch_all(con, f"SELECT product_id FROM ({buyers}) WHERE n > ? ORDER BY n, product_id LIMIT 1",
                              [twentieth])
        [(cold,)] = fetch_all(con, f"SELECT product_id FROM ({buyers}) WHERE n < ? AND in_stock "
                                       "ORDER BY n DESC, product_id LIMIT 1",
                              [twentieth])
        con.execute("""UPDATE analytics.dim_products AS d SET name = p.name, description = p.description,
                              category = p.category
                       FROM analytics.dim_products AS p WHERE p.product_id = ? AND d.product_id = ?""", [twin, cold])
    assert run([product_embeddings], resources).success
    ease_only = {"ops": {"recommendations": {"config": {"select_model": False, "max_items": 20}}}}
    meta = metadata_of(run([recommendations], resources, ease_only), "recommendations")
    assert meta["cold_start_products_in_reach"] >= 1
    with resources["warehouse"].connect(read_only=True) as con:
        through_text = fetch_all(con, "SELECT DISTINCT product_id FROM ml.recommendations WHERE strategy = 'text_neighbour'")
        buyer_got_it = fetch_scalar(con, """SELECT count(*) FROM ml.recommendations r JOIN analytics.stg_purchases p
                                            USING (customer_id, product_id)""")
        stored = fetch_scalar(con, "SELECT count(*) FROM ml.recommendations WHERE strategy = 'text_neighbour'")
    assert (cold,) in through_text
    assert buyer_got_it == 0, "never a product the customer bought"
    assert meta["cold_start_recommendations"] == stored > 0
    assert meta["cold_start_products_recommended"] == len(through_text)
