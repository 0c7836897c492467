"""Model clients against a real HTTP server on 127.0.0.1 and real DuckDB files in tmp dirs."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from resources.model_clients import METRIC_KEYS, ChatModel, EmbeddingModel, ModelCallError
from resources.model_clients.errors import ModelConfigurationError
from resources.warehouse import DuckDBWarehouse, fetch_all, fetch_scalar
from tests.fake_openai_server import (
    BAD_REQUEST,
    DROP,
    DUPLICATE_INDEX,
    ECHO_AUTH,
    HANG,
    MALFORMED_JSON,
    NAN,
    RATE_LIMIT,
    SERVER_ERROR,
    SHORT,
    UNAUTHORIZED,
    UNAVAILABLE,
    WRONG_DIMS,
    WRONG_ORDER,
    FakeOpenAIServer,
    expected_vector,
)

ROOT = Path(__file__).resolve().parents[1]
DIMS = 32
API_KEY = "sk-test-key-0123456789"


@pytest.fixture
def server():
    with FakeOpenAIServer(default_dimensions=DIMS, retry_after_s=0.02, hang_seconds=2.0) as fake:
        yield fake


def remote_model(server: FakeOpenAIServer, **overrides) -> EmbeddingModel:
    knobs = dict(
        provider="openai",
        model="fake-embed",
        dimensions=DIMS,
        base_url=server.base_url,
        api_key=API_KEY,
        max_batch_size=8,
        max_concurrency=4,
        max_attempts=8,
        request_timeout_seconds=1.0,
        backoff_base_seconds=0.01,
        backoff_cap_seconds=0.05,
        breaker_failure_threshold=50,
        breaker_cooldown_seconds=0.5,
        write_chunk_rows=32,
        lookup_chunk_size=64,
    )
    knobs.update(overrides)
    return EmbeddingModel(**knobs)


def catalog(count: int, prefix: str = "item") -> list[tuple[str, str]]:
    return [(f"{prefix}-{i:05d}", f"{prefix} text number {i}") for i in range(count)]


def stored_vectors(model: EmbeddingModel, warehouse: DuckDBWarehouse, stage: str, partition_key: str | None = None):
    vectors = {}
    for batch in model.to_arrow_reader(warehouse, stage=stage, partition_key=partition_key, batch_rows=50):
        keys = batch.column("item_key").to_pylist()
        matrix = batch.column("vector").flatten().to_numpy().reshape(len(keys), model.dimensions)
        vectors.update(zip(keys, matrix))
    return vectors


def assert_all_stored(model, warehouse, stage, items, partition_key=None):
    vectors = stored_vectors(model, warehouse, stage, partition_key)
    assert set(vectors) == {key for key, _ in items}
    for key, text in items:
        np.testing.assert_allclose(vectors[key], expected_vector(text, model.dimensions), atol=1e-6)


def dead_letters(warehouse: DuckDBWarehouse, stage: str) -> dict[str, dict]:
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(
            con,
            """SELECT item_key, reason_class, error_message, attempts, payload_hash, first_seen, last_seen, resolved_at
               FROM ops.dead_letter WHERE stage = ? ORDER BY item_key""",
            [stage],
        )
    names = "item_key reason_class error_message attempts payload_hash first_seen last_seen resolved_at".split()
    return {row[0]: dict(zip(names, row)) for row in rows}


# -- retries and faults ---------------------------------------------------------------------------


def test_transient_faults_on_a_fifth_of_requests_lose_nothing(server, warehouse):
    server.transient_rate = 0.2
    server.transient_faults = (
        RATE_LIMIT, SERVER_ERROR, UNAVAILABLE, DROP, MALFORMED_JSON, SHORT, WRONG_DIMS, DUPLICATE_INDEX, HANG,
    )  # fmt: skip
    model = remote_model(server, request_timeout_seconds=1.0)  # a hang (2 s) times out; a slow CI does not
    items = catalog(480)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="transient", partition_key="2024-01-01")

    assert report.dlq_count == 0
    assert_all_stored(model, warehouse, "transient", items, "2024-01-01")
    faults = sum(n for fault, n in server.stats.faults.items() if fault != "ok")
    assert faults >= 6
    metrics = report.as_dict()
    assert metrics["retries"] >= faults  # every injected fault was retried (a slow CI may add a timeout)
    assert metrics["requests"] == server.stats.requests == 60 + metrics["retries"]  # one request a retry
    assert metrics["items_embedded"] == 480 and metrics["cache_hits"] == 0
    assert set(METRIC_KEYS) <= set(report.to_metadata())
    assert metrics["latency_ms_p50"] <= metrics["latency_ms_p95"] <= metrics["latency_ms_p99"]


def test_answers_in_another_order_are_put_back_by_index(server, warehouse):
    server.script(WRONG_ORDER, WRONG_ORDER)
    model = remote_model(server, max_concurrency=1)
    items = catalog(16)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="order")
    assert report.as_dict()["retries"] == 0
    assert_all_stored(model, warehouse, "order", items)


def test_permanent_faults_are_dead_lettered_by_reason_and_the_rest_is_stored(server, warehouse):
    server.poison = {"SRV": UNAVAILABLE, "RATE": RATE_LIMIT, "HANG": HANG}
    model = remote_model(server, max_batch_size=1, max_attempts=3, request_timeout_seconds=0.2)
    good = catalog(20)
    bad = [("srv", "SRV down"), ("rate", "RATE limited"), ("hang", "HANG forever"), ("empty", "  ")]
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, good + bad, stage="permanent")

    letters = dead_letters(warehouse, "permanent")
    reasons = {key: (row["reason_class"], row["attempts"]) for key, row in letters.items()}
    assert reasons == {
        "srv": ("server_error", 3),
        "rate": ("rate_limited", 3),
        "hang": ("timeout", 3),
        "empty": ("client_error", 0),  # never sent
    }
    assert report.dlq_count == 4 and report.dead_letters_open == 4
    assert report.as_dict()["dlq_by_reason"] == {"client_error": 1, "rate_limited": 1, "server_error": 1, "timeout": 1}
    assert_all_stored(model, warehouse, "permanent", good)


def test_a_refused_key_stops_the_run_keeps_what_was_embedded_and_dead_letters_nothing(server, warehouse):
    server.poison = {"AUTH": UNAUTHORIZED}
    model = remote_model(server, max_batch_size=1, max_concurrency=1)
    with pytest.raises(ModelConfigurationError, match="401.*check OPENAI_API_KEY"), model.open() as embedder:
        embedder.embed_items(warehouse, [*catalog(5), ("auth", "AUTH refused"), *catalog(5, "after")], stage="auth")
    assert server.stats.statuses[401] == 1  # never retried
    assert dead_letters(warehouse, "auth") == {}
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.embedding_cache") >= 5


def test_bad_inputs_are_isolated_and_dead_letters_update_then_resolve(server, warehouse):
    server.poison = {"BADINPUT": BAD_REQUEST, "NANVEC": NAN}
    model = remote_model(server, max_attempts=2)
    good = catalog(30)
    items = good[:10] + [("bad", "BADINPUT here")] + good[10:20] + [("nan", "NANVEC here")] + good[20:]

    with model.open() as embedder:
        first = embedder.embed_items(warehouse, items, stage="isolate")
    letters = dead_letters(warehouse, "isolate")
    assert {k: r["reason_class"] for k, r in letters.items()} == {"bad": "client_error", "nan": "invalid_output"}
    assert "NaN" in letters["nan"]["error_message"] and first.dlq_count == 2
    assert_all_stored(model, warehouse, "isolate", good)  # their batch mates were kept

    server.reset_stats()
    with model.open() as embedder:
        embedder.embed_items(warehouse, items, stage="isolate")
    again = dead_letters(warehouse, "isolate")
    assert set(again) == {"bad", "nan"}  # updated, not duplicated
    assert again["nan"]["attempts"] > letters["nan"]["attempts"] >= 2  # attempts add up across runs
    assert again["bad"]["attempts"] > letters["bad"]["attempts"] >= 1
    assert again["nan"]["last_seen"] > again["nan"]["first_seen"] == letters["nan"]["first_seen"]
    assert all(server.stats.per_text[text] == 0 for _, text in good)  # cached: not paid twice

    server.poison = {}
    with model.open() as embedder:
        fixed = embedder.embed_items(warehouse, items, stage="isolate")
    resolved = dead_letters(warehouse, "isolate")
    assert all(row["resolved_at"] is not None for row in resolved.values())
    assert fixed.dead_letters_resolved == 2 and fixed.dead_letters_open == 0 and fixed.dlq_count == 0
    assert_all_stored(model, warehouse, "isolate", items)


def test_vectors_of_the_wrong_length_are_never_stored(server, warehouse):
    server.fail_all = WRONG_DIMS
    model = remote_model(server, max_attempts=2)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, catalog(12), stage="dims")
    assert report.as_dict()["dlq_by_reason"] == {"invalid_output": 12}
    assert "length 33 (expected 32)" in next(iter(dead_letters(warehouse, "dims").values()))["error_message"]
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.embedding_cache") == 0


def test_a_server_without_base64_gets_floats(server, warehouse):
    server.reject_base64 = True
    model = remote_model(server)
    items = catalog(24)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="floats")
        assert embedder.client.encoding_format == "float"
    assert report.dlq_count == 0
    # The refused base64 request is counted like any other, and its retry has its cause.
    assert report.metrics.requests == server.stats.requests
    assert report.metrics.retries["encoding_fallback"] >= 1
    assert_all_stored(model, warehouse, "floats", items)


def test_azure_openai_uses_the_deployment_url_the_api_version_and_the_api_key_header(server, warehouse):
    model = remote_model(
        server, base_url=f"http://127.0.0.1:{server.port}", azure_api_version="2024-10-21", azure_deployment="embed-dep"
    )
    items = catalog(10)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="azure")
    assert report.dlq_count == 0
    assert set(server.stats.paths) == {"/openai/deployments/embed-dep/embeddings?api-version=2024-10-21"}
    assert server.stats.authorization_headers == {f"api-key {API_KEY}"}
    assert_all_stored(model, warehouse, "azure", items)


@pytest.mark.parametrize("headers, retry_after, expected_wait", [("seconds", 0.3, 1.0), ("ms", 0.3, 0.3)])
def test_retry_after_is_waited(server, warehouse, headers, retry_after, expected_wait):
    server.retry_after_headers = headers
    server.retry_after_s = retry_after
    server.script(RATE_LIMIT)
    model = remote_model(server, max_concurrency=1, backoff_base_seconds=0.0)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, catalog(4), stage="retry_after")
    first, second = server.stats.arrivals[:2]
    assert expected_wait <= second - first < expected_wait + 1.0
    assert report.as_dict()["retries_by_cause"] == {"rate_limited": 1}


def test_the_concurrency_bound_is_never_exceeded(server, warehouse):
    server.latency_s = 0.03
    model = remote_model(server, max_concurrency=3)
    with model.open() as embedder:
        embedder.embed_items(warehouse, catalog(320), stage="bound")
    assert server.stats.max_in_flight == 3  # reached, never passed
    assert server.stats.requests == 40


def test_a_short_outage_loses_nothing_with_the_default_breaker(server, warehouse, caplog):
    """Every request fails with 503 for 2 s: the breaker opens, requests wait for its probe
    (visible in the log) and nothing is dead-lettered."""
    items = catalog(400)
    model = EmbeddingModel(provider="openai", model="fake-embed", dimensions=DIMS, base_url=server.base_url,
                           api_key=API_KEY, max_batch_size=8)  # the resource's defaults otherwise
    server.fail_all = UNAVAILABLE
    threading.Timer(2.0, lambda: setattr(server, "fail_all", None)).start()
    with caplog.at_level(logging.WARNING), model.open() as embedder:
        started = time.monotonic()
        report = embedder.embed_items(warehouse, items, stage="outage")
        elapsed = time.monotonic() - started
    assert report.dlq_count == 0 and report.metrics.breaker_opens >= 1
    assert any("circuit open after" in r.message and "then one probes" in r.message for r in caplog.records)
    assert any("circuit closed" in r.message for r in caplog.records)
    assert elapsed < 30
    assert_all_stored(model, warehouse, "outage", items)


def test_an_outage_longer_than_max_outage_seconds_dead_letters_and_the_next_run_heals(server, warehouse):
    server.fail_all = UNAVAILABLE
    breaker = {"breaker_failure_threshold": 3, "breaker_cooldown_seconds": 0.2, "max_outage_seconds": 1.0}
    model = remote_model(server, max_batch_size=1, max_concurrency=1, max_attempts=3, **breaker)
    items = catalog(20)
    with model.open() as embedder:
        down = embedder.embed_items(warehouse, items, stage="breaker")
        reasons = down.as_dict()["dlq_by_reason"]
        assert sum(reasons.values()) == 20 and reasons.get("circuit_open", 0) >= 15
        assert server.stats.requests < 40  # probes at the cool-down's pace, no hammering
        assert "max_outage_seconds 1" in dead_letters(warehouse, "breaker")["item-00019"]["error_message"]
    server.fail_all = None
    with model.open() as embedder:  # the next run
        healed = embedder.embed_items(warehouse, items, stage="breaker")
        assert healed.dlq_count == 0 and healed.dead_letters_resolved == 20 and healed.dead_letters_open == 0
        assert embedder.caller.breaker.state == "closed"
    assert_all_stored(model, warehouse, "breaker", items)


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- crash and resume -------------------------------------------------------------------------------

CHILD = """
import sys
from resources.model_clients import EmbeddingModel
from resources.warehouse import DuckDBWarehouse
db, url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = EmbeddingModel(provider="openai", model="fake-embed", dimensions=32, base_url=url, api_key="k")  # defaults
items = [(f"item-{i:05d}", f"item text number {i}") for i in range(count)]
with model.open() as embedder:
    embedder.embed_items(DuckDBWarehouse(path=db), items, stage="resume", partition_key="2024-01-01")
print("finished", flush=True)
"""


def test_a_run_killed_mid_way_pays_again_for_at_most_one_write_window(server, warehouse):
    """kill -9 at about half way, with the resource's default settings. At half way the server
    stops answering (new requests hang), so every answer it gave has reached the client; once
    a write interval has passed, the kill may cost at most one write window of those answers.
    (The old rule, a write per 2,048 vectors, lost 1,536 answered texts here.)"""
    defaults = EmbeddingModel()
    server.latency_s = 0.25
    server.hang_seconds = 60.0
    count = 12_000  # 47 requests of the default 256 texts, 8 at a time
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(warehouse.file), server.base_url, str(count)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while sum(server.stats.answered_per_text.values()) < count // 2 and time.monotonic() < deadline:
        assert child.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    server.fail_all = HANG
    answered = -1
    while answered != sum(server.stats.answered_per_text.values()):  # the requests under way finish
        answered = sum(server.stats.answered_per_text.values())
        time.sleep(server.latency_s * 2)
    time.sleep(defaults.write_interval_seconds + 0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert child.returncode == -signal.SIGKILL
    server.fail_all = None
    answered_before = set(server.stats.answered_per_text)

    with warehouse.connect(read_only=True) as con:
        cached_before = {row[0] for row in fetch_all(con, "SELECT text_hash FROM ops.embedding_cache")}
    assert 0 < len(cached_before) < count

    server.reset_stats()
    model = remote_model(server, max_batch_size=256, max_concurrency=8, api_key="k")
    items = catalog(count)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="resume", partition_key="2024-01-01")
        hashes = {text: embedder.text_hash(text) for _, text in items}
    assert [text for text, h in hashes.items() if h in cached_before and server.stats.per_text[text]] == []
    paid_twice = [text for text in answered_before if server.stats.per_text[text]]
    assert len(paid_twice) <= defaults.write_chunk_rows, f"{len(paid_twice)} answered texts were requested again"
    assert report.metrics.cache_hits == len(cached_before)
    assert report.metrics.items_embedded == count - len(cached_before)
    with warehouse.connect(read_only=True) as con:
        duplicates = fetch_scalar(
            con, "SELECT count(*) FROM (SELECT text_hash FROM ops.embedding_cache GROUP BY ALL HAVING count(*) > 1)"
        )
        assert duplicates == 0
        assert fetch_scalar(con, "SELECT count(*) FROM ops.embedding_cache") == count
        assert fetch_scalar(con, "SELECT count(DISTINCT item_key) = count(*) FROM ops.embedding_items")
    assert_all_stored(model, warehouse, "resume", items, "2024-01-01")


def cache_rows_per_write(warehouse: DuckDBWarehouse) -> list[int]:
    """Vectors committed by each cache write, in order (a write stamps its rows with one time)."""
    with warehouse.connect(read_only=True) as con:
        rows = fetch_all(con, "SELECT count(*) FROM ops.embedding_cache GROUP BY created_at ORDER BY created_at")
    return [row[0] for row in rows]


def test_texts_repeated_across_chunks_in_flight_are_requested_once_and_stored_once(server, warehouse):
    # Each look-up chunk repeats half of the one before while its requests are still in flight
    # (look-ups run a chunk ahead), and the whole list comes again in a second run.
    server.latency_s = 0.01
    items = [(f"k{c:03d}-{j:02d}", f"text {c * 20 + j}") for c in range(30) for j in range(40)]
    texts = {text for _, text in items}
    model = remote_model(server, max_batch_size=4, max_concurrency=8, lookup_chunk_size=40, write_chunk_rows=16)
    with model.open() as embedder:
        first = embedder.embed_items(warehouse, items, stage="overlap")
        second = embedder.embed_items(warehouse, items, stage="overlap")
    assert set(server.stats.per_text) == texts and set(server.stats.per_text.values()) == {1}
    assert first.metrics.items_embedded == len(texts) and first.metrics.deduplicated == len(items) - len(texts)
    assert second.metrics.cache_hits == len(items) and second.metrics.items_embedded == 0
    assert sum(cache_rows_per_write(warehouse)) == len(texts)  # one cache row a text, no key needed
    assert_all_stored(model, warehouse, "overlap", items)


def test_writes_gather_while_the_database_is_busy_and_stall_the_requests_at_the_cap(server, warehouse):
    # Another connection holds the warehouse for 1.5 s mid-run (as a check or a sensor would):
    # the next write waits, vectors gather up to max_write_rows, then the requests stop instead
    # of buffering without bound; once it is free, bigger writes catch up.
    server.latency_s = 0.01
    chunk_rows, cap, batch, concurrency = 16, 128, 4, 4
    model = remote_model(
        server, max_batch_size=batch, max_concurrency=concurrency, write_chunk_rows=chunk_rows, max_write_rows=cap,
        lookup_chunk_size=200,
    )  # fmt: skip
    items = catalog(1_200)
    requests_while_held: list[int] = []

    def hold_the_warehouse() -> None:
        while server.stats.requests < 40:
            time.sleep(0.005)
        with warehouse.connect(read_only=True):
            time.sleep(1.0)
            requests_while_held.append(server.stats.requests)
            time.sleep(0.5)
            requests_while_held.append(server.stats.requests)

    holder = threading.Thread(target=hold_the_warehouse)
    holder.start()
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="busy")
    holder.join()

    assert requests_while_held[0] == requests_while_held[1] < 1_200 // batch  # stalled at the cap
    writes = cache_rows_per_write(warehouse)
    in_flight = 4 * concurrency * batch  # requests outstanding when the cap is reached
    assert max(writes) > 2 * chunk_rows  # a write gathered what piled up meanwhile
    assert max(writes) <= cap + in_flight
    assert report.dlq_count == 0 and sum(writes) == len(items)
    assert_all_stored(model, warehouse, "busy", items)


def test_a_cache_made_with_the_old_primary_key_is_rebuilt_without_it_and_keeps_its_vectors(server, warehouse):
    items = catalog(40)
    model = remote_model(server)
    with model.open() as embedder:
        hashes = [embedder.text_hash(text) for _, text in items[:25]]
    with warehouse.transaction() as con:  # the table as warehouses made before this change have it
        con.execute("CREATE SCHEMA ops")
        con.execute("""CREATE TABLE ops.embedding_cache (model VARCHAR NOT NULL, dimensions INTEGER NOT NULL,
                       text_hash VARCHAR NOT NULL, vector FLOAT[] NOT NULL, created_at TIMESTAMP NOT NULL,
                       PRIMARY KEY (model, dimensions, text_hash))""")
        for (_, text), text_hash in zip(items, hashes):
            con.execute("INSERT INTO ops.embedding_cache VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                        [model.model_id, DIMS, text_hash, expected_vector(text, DIMS).tolist()])

    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="migrated")
    with warehouse.connect(read_only=True) as con:
        keys = fetch_scalar(con, "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'embedding_cache' "
                                 "AND constraint_type = 'PRIMARY KEY'")
        rows = fetch_scalar(con, "SELECT count(*) FROM ops.embedding_cache")
    assert keys == 0 and rows == 40
    assert report.metrics.cache_hits == 25 and report.metrics.items_embedded == 15
    assert_all_stored(model, warehouse, "migrated", items)


# -- secrets ----------------------------------------------------------------------------------------


def test_the_api_key_never_reaches_logs_metadata_database_or_exceptions(server, warehouse, monkeypatch, caplog):
    secret = f"sk-proj-{uuid.uuid4().hex}"
    monkeypatch.setenv("FAKE_OPENAI_API_KEY", secret)
    server.poison = {"LEAK": ECHO_AUTH}  # a server that repeats the Authorization header back
    caplog.set_level(logging.DEBUG)

    @dg.asset
    def leaky_embeddings(context, embedding_model: EmbeddingModel, warehouse: DuckDBWarehouse):
        context.log.info(f"resource as initialised: {embedding_model!r} / {embedding_model}")
        with embedding_model.open(context) as embedder:
            report = embedder.embed_items(warehouse, [("a", "hello")], stage="leak")
            context.log.info(f"session: {embedder.__dict__!r}")
            embedder.embed_items(warehouse, [("b", "LEAK this")], stage="leak")  # a 401: the step fails
        return dg.MaterializeResult(metadata=report.to_metadata())

    @dg.asset
    def failing_embeddings(context, embedding_model: EmbeddingModel):
        with embedding_model.open(context) as embedder:
            embedder.embed_texts(["LEAK again"])

    model = remote_model(server, api_key=dg.EnvVar("FAKE_OPENAI_API_KEY"))
    instance = dg.DagsterInstance.ephemeral()
    resources = {"embedding_model": model, "warehouse": warehouse}
    leaky = dg.materialize([leaky_embeddings], resources=resources, instance=instance, raise_on_error=False)
    failed = dg.materialize([failing_embeddings], resources=resources, instance=instance, raise_on_error=False)
    assert not leaky.success and not failed.success
    assert f"Bearer {secret}" in server.stats.authorization_headers  # the key was really used

    with pytest.raises(ModelCallError) as raised:
        with remote_model(server, api_key=secret).open() as embedder:
            embedder.embed_texts(["LEAK directly"])

    seen = [caplog.text, str(raised.value), repr(raised.value), "".join(traceback.format_exception(raised.value))]
    for run in (leaky, failed):
        seen += [str(record) for record in instance.all_logs(run.run_id)]
        seen.append(str(instance.get_run_by_id(run.run_id)))
    seen += [repr(model), str(model), repr(remote_model(server, api_key=secret))]
    assert any("resource as initialised: EmbeddingModel(" in text for text in seen)
    with warehouse.connect(read_only=True) as con:
        tables = fetch_all(con, "SELECT table_schema, table_name FROM information_schema.tables")
        for schema, table in tables:
            seen.append(str(fetch_all(con, f'SELECT * FROM "{schema}"."{table}"')))
    assert "Incorrect API key provided" in "".join(seen)  # the leaky message did travel ...
    assert all(secret not in text for text in seen)  # ... without the key


# -- reading back, scale, chat ------------------------------------------------------------------------


def test_twenty_thousand_items_stream_through_and_read_back_in_pages(server, warehouse):
    # the resource's own request timeout: no fault is injected here, and remote_model's 1 s (for the
    # hang tests) made loaded CI runs give up on a 256-text request while the server was answering
    default_timeout = EmbeddingModel.model_fields["request_timeout_seconds"].default
    model = remote_model(server, max_batch_size=256, max_concurrency=4, write_chunk_rows=2048, lookup_chunk_size=4096,
                         request_timeout_seconds=default_timeout)
    count = 20_000
    items = ((f"p{i:06d}", f"product {i % 15_000} description") for i in range(count))  # a generator, 5k repeats
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="scale")
        pages = list(embedder.iter_numpy(warehouse, stage="scale", batch_rows=3_000))
    assert report.metrics.items == count and report.metrics.items_embedded == 15_000
    # Repeats are free: in flight they are deduplicated, once flushed they are cache hits.
    assert report.metrics.deduplicated + report.metrics.cache_hits == 5_000 and report.dlq_count == 0
    assert server.stats.requests == -(-15_000 // 256)
    keys = [key for page_keys, _ in pages for key in page_keys]
    assert len(keys) == count and keys == sorted(keys) and max(len(k) for k, _ in pages) <= 3_000
    sample = {key: matrix[0] for page_keys, matrix in pages for key in page_keys[:1]}
    for key, vector in sample.items():
        np.testing.assert_allclose(vector, expected_vector(f"product {int(key[1:]) % 15_000} description", DIMS), atol=1e-6)


def test_a_day_with_a_few_new_texts_takes_the_warehouse_lock_four_times(server, warehouse, monkeypatch):
    """The catalog step runs beside the warehouse writers, and each trip to the lock can wait for
    a whole writer step: a mostly cached catalog (20,000 products, 100 new) costs one setup write,
    one look-up, one write of the new vectors and the item map, one resolve of its dead letters.
    (It took ten: a setup and a forget, five look-ups and item-map writes of 4,096, a resolve and
    a count.)"""
    # the resource's own batching and look-up defaults (remote_model shrinks them for other tests)
    defaults = {name: EmbeddingModel.model_fields[name].default
                for name in ("max_batch_size", "write_chunk_rows", "lookup_chunk_size", "max_write_rows")}
    model = remote_model(server, **defaults)
    items = catalog(20_000, "product")
    with model.open() as embedder:
        embedder.embed_items(warehouse, items[:19_900], stage="catalog")
    trips = []
    connect = DuckDBWarehouse.connect

    def counted(self, read_only: bool = False):
        trips.append("read" if read_only else "write")
        return connect(self, read_only=read_only)

    monkeypatch.setattr(DuckDBWarehouse, "connect", counted)
    with model.open() as embedder:
        report = embedder.embed_items(warehouse, items, stage="catalog")
    monkeypatch.undo()
    assert report.metrics.cache_hits == 19_900 and report.metrics.items_embedded == 100 and report.dlq_count == 0
    assert trips == ["write", "read", "write", "write"], trips
    assert_all_stored(model, warehouse, "catalog", items)


def test_the_reader_can_be_registered_inside_the_callers_own_transaction(server, warehouse):
    model = remote_model(server)
    items = catalog(120)
    with model.open() as embedder:
        embedder.embed_items(warehouse, items, stage="copy", partition_key="2024-01-02")
        reader = embedder.to_arrow_reader(warehouse, stage="copy", partition_key="2024-01-02", batch_rows=25)
    with warehouse.transaction() as con:  # the reader needs no connection of its own
        con.register("vectors", reader)
        con.execute("CREATE SCHEMA IF NOT EXISTS ml")
        con.execute("CREATE TABLE ml.copied AS SELECT item_key, vector FROM vectors")
        con.unregister("vectors")
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ml.copied") == 120
        assert fetch_scalar(con, "SELECT typeof(vector) FROM ml.copied LIMIT 1") == f"FLOAT[{DIMS}]"
    assert not list(warehouse.file.parent.glob(".vectors-*"))  # the spool file is gone


def chat_model(server: FakeOpenAIServer, **overrides) -> ChatModel:
    knobs = dict(
        provider="openai",
        model="fake-chat",
        base_url=server.base_url,
        api_key=API_KEY,
        max_attempts=3,
        backoff_base_seconds=0.01,
        backoff_cap_seconds=0.02,
        request_timeout_seconds=1.0,
    )
    knobs.update(overrides)
    return ChatModel(**knobs)


def test_chat_returns_parsed_json_and_dead_letters_malformed_replies(server, warehouse):
    server.script(MALFORMED_JSON)
    with chat_model(server).open() as chat:
        assert chat.complete_json([{"role": "user", "content": "describe a red shirt"}]) == {
            "summary": "describe a red shirt",
            "length": 20,
        }
        server.poison = {"GARBLED": MALFORMED_JSON}
        items = [("ok", [{"role": "user", "content": "fine"}]), ("bad", [{"role": "user", "content": "GARBLED"}])]
        report = chat.complete_items(warehouse, items, stage="chat")
    assert report.results == {"ok": {"summary": "fine", "length": 4}}
    assert report.metrics.as_dict()["dlq_by_reason"] == {"invalid_output": 1} and report.dlq_count == 1
    letters = dead_letters(warehouse, "chat")
    assert letters["bad"]["reason_class"] == "invalid_output" and letters["bad"]["attempts"] == 3


def test_chat_is_disabled_by_default():
    assert not ChatModel().enabled
    with pytest.raises(dg.Failure, match="disabled"):
        with ChatModel().open():
            pass


def test_build_resources_runs_offline_by_default_and_reads_openai_settings_from_the_env(monkeypatch):
    from resources import build_resources

    for name in ("MODEL_PROVIDER", "OPENAI_API_KEY", "OPENAI_BASE_URL", "CHAT_MODEL", "EMBEDDING_DIMENSIONS"):
        monkeypatch.delenv(name, raising=False)
    offline = build_resources()
    assert offline["embedding_model"].provider == "local" and offline["embedding_model"].api_key is None
    assert not offline["chat_model"].enabled

    monkeypatch.setenv("MODEL_PROVIDER", "openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    monkeypatch.setenv("EMBEDDING_DIMENSIONS", "256")
    monkeypatch.setenv("CHAT_MODEL", "gpt-4o-mini")
    remote = build_resources()
    embedding = remote["embedding_model"]
    assert (embedding.provider, embedding.dimensions, embedding.base_url) == ("openai", 256, "http://127.0.0.1:9/v1")
    assert isinstance(embedding.api_key, dg.EnvVar) and embedding.api_key.env_var_name == "OPENAI_API_KEY"
    assert remote["chat_model"].enabled


def test_a_strict_rate_limit_is_met_without_a_storm_of_429s(warehouse):
    """A server whose bucket holds one request (burst 1): the client learns its pace from the
    budget headers and keeps to it. (The old throttle got 35 % of requests refused and 35 % of
    the limit; the figures of the goal, 90 % of the limit with at most 1 % refused, are the
    client benchmark's, with the server in its own process: `python -m bench.model_clients
    --rate-limit 50 --burst 1`. Here the server shares our process and its GIL, and other test
    workers share the 2 cores, which makes arrivals jitter more, hence the loose bounds: a quiet
    run refuses under 8 % at over 60 % of the limit; loaded CI runs refused 22 %, or kept 55 %
    of the limit, before the pace kept to the times requests actually go (2026-12-08: with three
    busy processes 8-15 % refused before, 3.6-5.5 % after). Speed is the benchmark's to measure.)"""
    with FakeOpenAIServer(default_dimensions=DIMS, latency_s=0.02, rate_limit_rps=40, burst=1) as strict:
        model = remote_model(strict, max_batch_size=4, max_concurrency=8, max_attempts=8)
        items = catalog(4 * 240)
        with model.open() as embedder:
            started = time.monotonic()
            report = embedder.embed_items(warehouse, items, stage="strict")
            rate = strict.stats.requests / (time.monotonic() - started)
        refused = strict.stats.statuses[429] / strict.stats.requests
    assert report.dlq_count == 0
    assert refused <= 0.3, f"{refused:.1%} of requests refused"
    assert rate >= 0.3 * 40, f"{rate:.1f} requests/s against a limit of 40"


@pytest.mark.parametrize("earlier_days", [2, 8])  # 40,000 rows deleted; 160,000 rows: the map rebuilt
def test_retiring_earlier_item_maps_keeps_exactly_the_rest_and_the_key(tmp_path, earlier_days):
    """Past REBUILD_ITEMS_ABOVE rows (the first build after months of maps) the item map is rebuilt
    from the rows that stay instead of deleted row by row: the same rows stay either way (the
    build's day, later days, the replay job's map, other stages'), and the key still holds."""
    import duckdb

    from resources.model_clients import store

    def rows(con) -> list[tuple]:
        return fetch_all(con, "SELECT stage, partition_key, count(*) FROM ops.embedding_items GROUP BY ALL ORDER BY ALL")

    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        store.ensure_tables_on(con)
        days = [f"2011-09-{n:02d}" for n in range(1, earlier_days + 3)]
        for stage, day in [("product_embeddings", d) for d in days] + [("product_embeddings", "replay"),
                                                                        ("other", days[0])]:
            con.execute("INSERT INTO ops.embedding_items SELECT ?, ?, 'p' || range, 'm', 3, 'h' || range, false, now() "
                        "FROM range(20000)", [stage, day])
        build_day = days[earlier_days]
        con.execute("BEGIN")
        retired, _ = store.retire_superseded(con, "product_embeddings", build_day, 0)
        con.execute("COMMIT")
        assert retired == earlier_days * 20000
        assert rows(con) == [("other", days[0], 20000), ("product_embeddings", build_day, 20000),
                             ("product_embeddings", days[-1], 20000), ("product_embeddings", "replay", 20000)]
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO ops.embedding_items VALUES ('other', ?, 'p1', 'm', 3, 'x', false, now())", [days[0]])
    assert (retired > store.REBUILD_ITEMS_ABOVE) == (earlier_days == 8)  # both ways are taken
