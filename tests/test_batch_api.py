"""The bulk path: a whole catalog through the OpenAI Batch API (a fake one on 127.0.0.1), daily
deltas through the synchronous client, and every text accounted for: stored, or in the DLQ with
the batch's reason."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from assets.infer.embeddings import PRODUCT_TEXT_SQL, product_embeddings
from resources.model_clients import EmbeddingModel
from resources.model_clients.texts import prepare_text
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar
from tests.fake_batch_api import FakeBatchAPIServer
from tests.fake_openai_server import expected_vector
from tests.test_pipeline import modelled_warehouse, pipeline_resources

DAY = "2011-09-01"
DIMS = 384


@pytest.fixture(scope="module")
def catalog_warehouse(tmp_path_factory) -> tuple[Path, Path]:
    """A landed and modelled product catalog (dim_products), nothing embedded yet."""
    return modelled_warehouse(tmp_path_factory.mktemp("batch"), 50, 11, (
        "raw_products", "raw_customers", "raw_transactions", "stg_order_lines", "dim_products"))


@pytest.fixture
def server():
    with FakeBatchAPIServer(default_dimensions=DIMS) as fake:
        yield fake


def resources_for(tmp_path: Path, catalog_warehouse, server: FakeBatchAPIServer, **batch_options) -> dict:
    path = tmp_path / "warehouse.duckdb"
    shutil.copy(catalog_warehouse[0], path)
    resources = pipeline_resources(path, catalog_warehouse[1], server)
    options = {"batch_api_min_texts": 10, "batch_poll_seconds": 0.01, **batch_options}
    resources["embedding_model"] = EmbeddingModel(provider="openai", model="fake-embed", dimensions=DIMS,
                                                  base_url=server.base_url, api_key="test-key", **options)
    return resources


def embed(resources: dict, force: bool = False) -> dg.ExecuteInProcessResult:
    """One run of product_embeddings; red when the blocking dead_letter_share check fails (over 1 %)."""
    run_config = {"ops": {"product_embeddings": {"config": {"force": True}}}} if force else None
    return dg.materialize([product_embeddings], partition_key=DAY, resources=resources, run_config=run_config,
                          raise_on_error=False)


def metadata(result) -> dict:
    event = result.get_asset_materialization_events()[0]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def coverage_check(result):
    return next(c for c in result.get_asset_check_evaluations() if c.check_name == "products_embedded")


def product_texts(warehouse: DuckDBWarehouse) -> dict[str, str]:
    with warehouse.connect(read_only=True) as con:
        return {pid: prepare_text(pid, text, 8_000).text for pid, text in fetch_all(con, PRODUCT_TEXT_SQL) if text}


def stored_vectors(warehouse: DuckDBWarehouse) -> dict[str, np.ndarray]:
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(con, "SELECT product_id, vector FROM ml.product_embeddings")
    return {pid: np.asarray(vector, dtype=np.float32) for pid, vector in rows}


def open_dead_letters(warehouse: DuckDBWarehouse) -> dict[str, tuple[str, str]]:
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(con, "SELECT item_key, reason_class, error_message FROM ops.dead_letter "
                              "WHERE stage = 'product_embeddings' AND resolved_at IS NULL")
    return {key: (reason, message) for key, reason, message in rows}


def test_a_whole_catalog_goes_through_one_batch_and_a_daily_delta_through_the_synchronous_client(
        tmp_path, catalog_warehouse, server):
    resources = resources_for(tmp_path, catalog_warehouse, server)
    warehouse = resources["warehouse"]
    texts = product_texts(warehouse)
    result = embed(resources)
    meta = metadata(result)
    assert result.success and meta["batch_api_batches"] == 1 and meta["batch_api_embedded"] == len(set(texts.values()))
    assert meta["batch_api_failed"] == 0 and meta["dlq_count"] == 0 and coverage_check(result).passed
    assert server.stats.requests == 0, "no text went through the synchronous endpoint"
    assert server.batch_calls.count("create") == 1
    vectors = stored_vectors(warehouse)
    assert set(vectors) == set(texts)
    for product_id, text in texts.items():  # every vector is its own text's, as the synchronous path gives it
        np.testing.assert_allclose(vectors[product_id], expected_vector(text, DIMS), atol=1e-6)

    # Later one product is renamed (edited in place, so the build is forced): one uncached text
    # is below the threshold.
    renamed = sorted(texts)[0]
    with warehouse.transaction() as con:
        con.execute("UPDATE analytics.dim_products SET name = name || ' (new)' WHERE product_id = ?", [renamed])
    result = embed(resources, force=True)
    meta = metadata(result)
    assert "batch_api_batches" not in meta and meta["requests"] == 1 and meta["items_embedded"] == 1
    assert server.batch_calls.count("create") == 1 and server.stats.requests == 1
    new_text = product_texts(warehouse)[renamed]
    np.testing.assert_allclose(stored_vectors(warehouse)[renamed], expected_vector(new_text, DIMS), atol=1e-6)


def test_failed_requests_of_a_batch_go_to_the_dlq_with_their_reason_and_the_rest_is_stored(
        tmp_path, catalog_warehouse, server):
    resources = resources_for(tmp_path, catalog_warehouse, server)
    warehouse = resources["warehouse"]
    texts = product_texts(warehouse)
    victim = sorted(texts)[3]
    server.fail_markers = {texts[victim]: 400}
    result = embed(resources)
    assert result.success and not coverage_check(result).passed  # WARN: the step's outputs stand
    dead = open_dead_letters(warehouse)
    assert set(dead) == {victim} and dead[victim][0] == "client_error" and "HTTP 400" in dead[victim][1]
    assert set(stored_vectors(warehouse)) == set(texts) - {victim}  # every text: stored or dead-lettered
    assert server.stats.requests == 0, "a text the batch failed is not sent again in the same run"


def test_an_expired_batch_keeps_what_was_done_and_dead_letters_the_rest_as_timeouts(
        tmp_path, catalog_warehouse, server):
    resources = resources_for(tmp_path, catalog_warehouse, server)
    warehouse = resources["warehouse"]
    texts = product_texts(warehouse)
    server.expire_after = 5
    result = embed(resources)
    meta = metadata(result)
    assert not result.success, "most of the catalog in the DLQ is a red run"
    assert meta["batch_api_embedded"] == 5
    dead = open_dead_letters(warehouse)
    assert len(stored_vectors(warehouse)) + len(dead) == len(texts)
    assert {reason for reason, _ in dead.values()} == {"timeout"}
    assert all("completion window expired" in message for _, message in dead.values())


def test_a_batch_still_running_when_the_step_stops_waiting_is_collected_by_the_next_run_not_paid_twice(
        tmp_path, catalog_warehouse, server):
    resources = resources_for(tmp_path, catalog_warehouse, server, batch_max_wait_seconds=0.05)
    warehouse = resources["warehouse"]
    texts = product_texts(warehouse)
    server.polls_until_done = 10_000
    result = embed(resources)
    dead = open_dead_letters(warehouse)
    assert set(dead) == set(texts) and {reason for reason, _ in dead.values()} == {"timeout"}
    assert all("the next run collects it" in message for _, message in dead.values())
    assert not result.success and not coverage_check(result).passed
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.embedding_batches WHERE collected_at IS NULL") == 1

    (batch,) = server.created_batches()
    batch["_settings"] = (0, *batch["_settings"][1:])  # the provider finishes it meanwhile
    result = embed(resources)  # open dead letters make the next run build again
    assert result.success and server.batch_calls.count("create") == 1 and server.stats.requests == 0
    assert metadata(result)["dlq_resolved"] == len(texts) and open_dead_letters(warehouse) == {}
    assert set(stored_vectors(warehouse)) == set(texts) and coverage_check(result).passed
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT status, embedded, failed FROM ops.embedding_batches WHERE collected_at IS NOT NULL") \
            == [("completed", len(set(texts.values())), 0)]


def test_a_rejected_batch_dead_letters_every_text_and_polling_rides_out_a_server_error(
        tmp_path, catalog_warehouse, server):
    resources = resources_for(tmp_path, catalog_warehouse, server)
    warehouse = resources["warehouse"]
    texts = product_texts(warehouse)
    server.reject_input, server.poll_failures = True, 2
    result = embed(resources)
    dead = open_dead_letters(warehouse)
    assert set(dead) == set(texts) and not result.success and not coverage_check(result).passed
    assert all(reason == "client_error" and "input file is not valid" in message for reason, message in dead.values())
    assert server.batch_calls.count("retrieve") >= 3  # two 503s, then the final status
    with warehouse.connect(read_only=True) as con:  # the key reaches neither the DLQ nor the batch table
        assert not fetch_scalar(con, "SELECT count(*) FROM ops.dead_letter WHERE error_message LIKE '%test-key%'")


def lake_embeddings(tmp_path: Path, catalog_warehouse, server: FakeBatchAPIServer, max_wait: float = 0.05):
    """A lake (SQLite catalog) with the day's catalog landed and modelled, and lake_product_embeddings
    with a Batch API model that stops waiting after `max_wait` s: (lakehouse, resources, the asset)."""
    from assets.common.lakehouse_stages import build_lakehouse_stage_assets
    from assets.ingest.lakehouse_landing import build_lakehouse_ingestion_assets
    from assets.transform.lakehouse_models import LAKE_MODELS_ASSET, lake_sql_models_asset
    from assets.transform.sql_models import SQL_DIR, load_models
    from definitions import AI_ASSETS
    from resources.compute_engine import ComputeEngine
    from resources.lakehouse import Lakehouse
    from resources.landing import LandingZone

    lakehouse = Lakehouse(catalog_uri=f"sqlite:///{tmp_path}/catalog.db", location=str(tmp_path / "lake"))
    resources = {"lakehouse": lakehouse, "landing": LandingZone(root=str(catalog_warehouse[1])),
                 "compute_engine": ComputeEngine(),
                 "embedding_model": resources_for(tmp_path, catalog_warehouse, server,
                                                  batch_max_wait_seconds=max_wait)["embedding_model"]}
    assert dg.materialize([*build_lakehouse_ingestion_assets(), lake_sql_models_asset()], partition_key=DAY,
                          resources=resources).success
    [embeddings] = [a for a in build_lakehouse_stage_assets(LAKE_MODELS_ASSET, [m.name for m in load_models(SQL_DIR)],
                                                            AI_ASSETS)
                    if a.key.to_user_string() == "lake_product_embeddings"]
    return lakehouse, resources, embeddings


def lake_ledger(lakehouse) -> list[tuple]:
    """(status, collected, embedded) of each batch in the lake's ledger, the latest row a batch."""
    from assets.common.lakehouse_stages import BATCHES_TABLE

    rows = sorted(lakehouse.read_day(BATCHES_TABLE, DAY).to_pylist(), key=lambda row: row["collected_at"] is None)
    return [(row["status"], row["collected_at"] is not None, row["embedded"])
            for row in {row["batch_id"]: row for row in reversed(rows)}.values()]


def test_on_the_lakehouse_a_batch_still_running_is_collected_by_the_next_build_not_paid_twice(
        tmp_path, catalog_warehouse, server):
    """A lake build runs in a private DuckDB: its Batch API ledger goes to the lake with its dead
    letters, so the next build collects the batch the step stopped waiting for, as on the warehouse."""
    lakehouse, resources, embeddings = lake_embeddings(tmp_path, catalog_warehouse, server)

    def open_dead_letters() -> int:
        return sum(row["resolved_at"] is None for row in lakehouse.read_day("ops.dead_letter", DAY).to_pylist())

    texts = product_texts(DuckDBWarehouse(path=str(catalog_warehouse[0])))
    server.polls_until_done = 10_000
    first = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert not first.success  # every text dead-lettered: the blocking dead_letter_share check
    [(status, collected, _)] = lake_ledger(lakehouse)
    assert status in ("validating", "in_progress") and not collected
    assert open_dead_letters() == len(texts)

    (batch,) = server.created_batches()
    batch["_settings"] = (0, *batch["_settings"][1:])  # the provider finishes it meanwhile
    second = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert second.success and server.batch_calls.count("create") == 1 and server.stats.requests == 0
    assert lake_ledger(lakehouse) == [("completed", True, len(set(texts.values())))]
    assert open_dead_letters() == 0


def test_on_the_lakehouse_a_step_that_fails_after_submitting_leaves_its_batch_to_the_next_build(
        tmp_path, catalog_warehouse, server):
    """The step fails while it polls (the provider answers 503 past the wait): no build is written,
    but its ledger is, and the next build collects the batch instead of submitting the texts again."""
    lakehouse, resources, embeddings = lake_embeddings(tmp_path, catalog_warehouse, server)
    texts = product_texts(DuckDBWarehouse(path=str(catalog_warehouse[0])))
    server.poll_failures = 10**6
    failed = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert not failed.success and any(e.is_step_failure for e in failed.all_events)
    assert [collected for _, collected, _ in lake_ledger(lakehouse)] == [False]

    server.poll_failures = 0
    again = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert again.success and server.batch_calls.count("create") == 1 and server.stats.requests == 0
    assert lake_ledger(lakehouse) == [("completed", True, len(set(texts.values())))]


def test_on_the_lakehouse_a_step_terminated_while_polling_leaves_its_batch_to_the_next_build(
        tmp_path, catalog_warehouse, server, monkeypatch):
    """Terminating a run interrupts its step (SIGINT, as Dagster's run termination delivers it):
    the interrupted lake step writes its ledger on the way out, so the next build collects the
    batch the provider finishes meanwhile instead of paying for the texts again."""
    lakehouse, resources, embeddings = lake_embeddings(tmp_path, catalog_warehouse, server, max_wait=60)
    texts = product_texts(DuckDBWarehouse(path=str(catalog_warehouse[0])))
    server.polls_until_done = 10_000
    retrieve = server.retrieve

    def interrupted_while_polling(batch_id: str):
        if server.batch_calls.count("retrieve") == 0:  # once: the step's process, while it polls
            os.kill(os.getpid(), signal.SIGINT)
        return retrieve(batch_id)

    monkeypatch.setattr(server, "retrieve", interrupted_while_polling)
    terminated = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert not terminated.success and "create" in server.batch_calls
    assert any("DagsterExecutionInterruptedError" in str(e.event_specific_data) for e in terminated.all_events
               if e.is_step_failure)
    [(status, collected, _)] = lake_ledger(lakehouse)
    assert status in ("validating", "in_progress") and not collected

    monkeypatch.setattr(server, "retrieve", retrieve)
    (batch,) = server.created_batches()
    batch["_settings"] = (0, *batch["_settings"][1:])  # the provider finishes it meanwhile
    again = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert again.success and server.batch_calls.count("create") == 1 and server.stats.requests == 0
    assert lake_ledger(lakehouse) == [("completed", True, len(set(texts.values())))]


def test_a_build_retires_the_earlier_days_item_maps_and_the_vectors_no_product_needs_any_more(
        tmp_path, catalog_warehouse, server):
    """The item map is one per day, and the cache would keep every text ever embedded: a published
    build removes its stage's maps of earlier days and the cached vectors no map names once older
    than EMBEDDING_CACHE_KEEP_DAYS (30); a vector still named, or younger, stays; an older day's
    build leaves the later days' maps alone."""
    resources = resources_for(tmp_path, catalog_warehouse, server, batch_api_min_texts=10**6)
    warehouse = resources["warehouse"]

    def build(day: str) -> dict:
        result = dg.materialize([product_embeddings], partition_key=day, resources=resources, raise_on_error=False,
                                run_config={"ops": {"product_embeddings": {"config": {"force": True}}}})
        assert result.success
        return metadata(result)

    def item_map_days() -> dict[str, int]:
        with warehouse.connect(read_only=True) as con:
            return dict(fetch_all(con, "SELECT partition_key, count(*) FROM ops.embedding_items GROUP BY 1"))

    def cached() -> set[str]:
        with warehouse.connect(read_only=True) as con:
            return {h for (h,) in fetch_all(con, "SELECT text_hash FROM ops.embedding_cache")}

    first = build(DAY)
    products = first["dagster/row_count"]
    assert item_map_days() == {DAY: products} and first["cached_vectors"] == products
    with warehouse.connect(read_only=True) as con:
        hashes = dict(fetch_all(con, "SELECT product_id, text_hash FROM ml.product_embeddings ORDER BY 1"))
    left, renamed, left_lately = sorted(hashes)[:3]
    with warehouse.transaction() as con:  # the catalog changes; every vector but one was cached long ago
        con.execute("DELETE FROM analytics.dim_products WHERE product_id IN (?, ?)", [left, left_lately])
        con.execute("UPDATE analytics.dim_products SET name = name || ' (new edition)' WHERE product_id = ?", [renamed])
        con.execute("UPDATE ops.embedding_cache SET created_at = created_at - INTERVAL 40 DAY WHERE text_hash <> ?",
                    [hashes[left_lately]])

    second = build("2011-09-02")
    assert item_map_days() == {"2011-09-02": products - 2}
    assert second["item_map_rows_retired"] == products and second["cached_vectors_pruned"] == 2
    with warehouse.connect(read_only=True) as con:
        new_edition = fetch_scalar(con, "SELECT text_hash FROM ml.product_embeddings WHERE product_id = ?", [renamed])
    assert cached() == set(hashes.values()) - {hashes[left], hashes[renamed]} | {new_edition}
    assert stored_vectors(warehouse).keys() == set(hashes) - {left, left_lately}

    build(DAY)  # a backfill of the earlier day: the later day's map stays
    assert item_map_days() == {DAY: products - 2, "2011-09-02": products - 2}


def test_on_the_lakehouse_a_step_killed_outright_while_polling_leaves_its_batch_to_the_next_build(
        tmp_path, catalog_warehouse, server):
    """A lake step's ledger lives in its private DuckDB, which a SIGKILL (or the OOM killer) takes
    with it: the ledger row goes to the lake as soon as the batch is submitted, so the next build
    collects that batch instead of paying for the texts again."""
    import multiprocessing
    import time

    lakehouse, resources, embeddings = lake_embeddings(tmp_path, catalog_warehouse, server, max_wait=600)
    texts = product_texts(DuckDBWarehouse(path=str(catalog_warehouse[0])))
    server.polls_until_done = 10**9

    def build() -> None:  # in a forked process, as a run's step process
        dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)

    step = multiprocessing.get_context("fork").Process(target=build)
    step.start()
    deadline = time.monotonic() + 120
    while "retrieve" not in server.batch_calls and step.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "retrieve" in server.batch_calls, "the step never polled its batch"
    os.kill(step.pid, signal.SIGKILL)  # while it polls: no handler runs
    step.join()
    [(status, collected, _)] = lake_ledger(lakehouse)
    assert status in ("validating", "in_progress") and not collected

    (batch,) = server.created_batches()
    batch["_settings"] = (0, *batch["_settings"][1:])  # the provider finishes it meanwhile
    again = dg.materialize([embeddings], partition_key=DAY, resources=resources, raise_on_error=False)
    assert again.success and server.batch_calls.count("create") == 1 and server.stats.requests == 0
    assert lake_ledger(lakehouse) == [("completed", True, len(set(texts.values())))]
