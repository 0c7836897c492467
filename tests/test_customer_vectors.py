"""Customer vectors pooled from product embeddings: values, decay, chunking, bad input."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import scipy.sparse as sp
import pyarrow as pa
import pytest

from recsys.customer_vectors import PoolingReport, ProductEmbeddings, iter_customer_vectors

AS_OF = dt.date(2024, 3, 31)


def purchases(rows: list[tuple]) -> pa.Table:
    """(customer, product, amount, days before AS_OF or None) -> a purchase table."""
    def when(days):
        return None if days is None else dt.datetime.combine(AS_OF, dt.time(15, 30)) - dt.timedelta(days=days)

    return pa.table(
        {
            "customer_id": pa.array([r[0] for r in rows], pa.string()),
            "product_id": pa.array([r[1] for r in rows], pa.string()),
            "amount": pa.array([r[2] for r in rows], pa.float64()),
            "purchased_at": pa.array([when(r[3]) for r in rows], pa.timestamp("us")),
        }
    )


def pool(table: pa.Table, products: ProductEmbeddings, batch_rows: int | None = None, **options):
    report = PoolingReport()
    if not isinstance(table, pa.Table):  # already a stream of batches
        batches = table
    else:
        batches = table.to_batches(max_chunksize=batch_rows) if batch_rows else [table]
    chunks = list(iter_customer_vectors(batches, products, as_of=AS_OF, report=report, **options))
    return chunks, report


def concatenated(chunks) -> tuple[list[str], np.ndarray]:
    ids = [i for chunk in chunks for i in chunk.customer_ids.to_pylist()]
    return ids, np.concatenate([chunk.vectors for chunk in chunks])


@pytest.fixture
def axes() -> ProductEmbeddings:
    """Three products on orthogonal axes of a 4-dim space, so pooled vectors read off by hand."""
    return ProductEmbeddings.from_arrays(["p1", "p2", "p3"], np.eye(3, 4, dtype=np.float32) * 3.0)


def random_catalog(n_products: int, dims: int, seed: int) -> ProductEmbeddings:
    rng = np.random.default_rng(seed)
    ids = [f"p{i:04d}" for i in range(n_products)]
    return ProductEmbeddings.from_arrays(ids, rng.standard_normal((n_products, dims)))


def random_purchases(n_customers: int, n_products: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_customers):
        for _ in range(int(rng.integers(1, 12))):
            product = f"p{int(rng.integers(0, n_products)):04d}"
            rows.append((f"c{c:06d}", product, float(rng.lognormal(2, 1)), int(rng.integers(0, 900))))
    return purchases(rows)


def test_pooled_vector_equals_the_hand_computed_weighted_mean(axes):
    half_life = 30.0
    table = purchases([
        ("a", "p1", 10.0, 0),     # weight 10
        ("a", "p2", 40.0, 60),    # 40 * 0.5**2 = 10
        ("a", "p2", 20.0, 30),    # 20 * 0.5 = 10 -> p2 totals 20
        ("a", "p3", 5.0, 0),      # weight 5
    ])
    [chunk], _ = pool(table, axes, half_life_days=half_life)
    expected = np.array([10.0, 20.0, 5.0, 0.0]) / math.sqrt(10**2 + 20**2 + 5**2)
    np.testing.assert_allclose(chunk.vectors[0], expected, rtol=1e-6)
    assert chunk.vectors.dtype == np.float32


def test_pooled_vectors_have_unit_norm():
    products = random_catalog(300, 16, seed=1)
    chunks, _ = pool(random_purchases(500, 300, seed=2), products)
    _, vectors = concatenated(chunks)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_recent_purchases_weigh_more_and_shorter_half_life_weighs_them_more(axes):
    table = purchases([("a", "p1", 10.0, 5), ("a", "p2", 10.0, 200)])   # same spend, p1 recent
    leaning = []
    for half_life in (400.0, 90.0, 20.0):
        [chunk], _ = pool(table, axes, half_life_days=half_life)
        recent, old = chunk.vectors[0][0], chunk.vectors[0][1]
        assert recent > old
        leaning.append(recent / old)
    assert leaning[0] < leaning[1] < leaning[2]


def test_years_old_purchases_do_not_underflow_to_a_zero_vector(axes):
    table = purchases([("a", "p1", 1.0, 20_000), ("a", "p2", 1.0, 20_030)])
    [chunk], report = pool(table, axes, half_life_days=7.0)
    assert report.customers_skipped["degenerate_vector"] == 0
    # 30 days older at a 7-day half-life: weight ratio 2**(30/7).
    assert chunk.vectors[0][0] / chunk.vectors[0][1] == pytest.approx(2 ** (30 / 7), rel=1e-4)


def test_chunked_and_batched_equal_one_shot_exactly():
    products = random_catalog(200, 24, seed=3)
    table = random_purchases(1500, 200, seed=4)
    one_chunks, one_report = pool(table, products, chunk_lines=10**9)
    many_chunks, many_report = pool(table, products, batch_rows=37, chunk_lines=101)
    assert len(one_chunks) == 1 and len(many_chunks) > 50
    one_ids, one_vectors = concatenated(one_chunks)
    many_ids, many_vectors = concatenated(many_chunks)
    assert one_ids == many_ids
    np.testing.assert_array_equal(one_vectors, many_vectors)
    one_spend = sp.vstack([c.product_spend for c in one_chunks]).toarray()
    np.testing.assert_array_equal(one_spend, sp.vstack([c.product_spend for c in many_chunks]).toarray())
    assert one_report.as_dict() | {"chunks": 0} == many_report.as_dict() | {"chunks": 0}


def test_a_customer_longer_than_a_chunk_stays_whole(axes):
    table = purchases([("a", "p1", 1.0, 1)] * 50 + [("b", "p2", 1.0, 1)] * 3)
    chunks, _ = pool(table, axes, batch_rows=7, chunk_lines=10)
    ids, _ = concatenated(chunks)
    assert ids == ["a", "b"]


def test_same_input_gives_identical_output(axes):
    products = random_catalog(100, 8, seed=5)
    table = random_purchases(300, 100, seed=6)
    first, _ = pool(table, products, chunk_lines=200)
    second, _ = pool(table, products, chunk_lines=200)
    np.testing.assert_array_equal(concatenated(first)[1], concatenated(second)[1])


def test_customers_without_embeddable_purchases_are_skipped_and_counted(axes):
    table = purchases([
        ("a", "p1", 10.0, 1),
        ("b", "unknown", 10.0, 1),            # only a product without an embedding
        ("c", "p1", -5.0, 1),                 # a return only
        ("c", "p2", 0.0, 1),
        ("d", "p2", None, 1),                 # no amount
        ("e", "p2", 3.0, None),               # no timestamp
        (None, "p1", 1.0, 1),                 # no customer
        ("f", "p3", float("nan"), 1),
        ("f", "unknown", 4.0, 2),
        ("f", "p3", 2.0, 3),
    ])
    chunks, report = pool(table, axes)
    ids, _ = concatenated(chunks)
    assert ids == ["a", "f"]
    assert report.customers_in == 6 and report.customers_out == 2
    assert report.customers_skipped == {
        "no_embedded_products": 1, "no_valid_purchases": 3, "degenerate_vector": 0,
    }
    assert report.lines_ignored == {
        "null_customer": 1, "invalid_amount": 4, "null_timestamp": 1, "no_embedding": 2,
    }
    f = chunks[0].customer_ids.to_pylist().index("f")
    # Spend per embedded product: the NaN line and the unembedded product are not in it.
    assert chunks[0].product_spend[f].sum() == pytest.approx(2.0)


def test_lines_after_the_as_of_day_count_as_age_zero(axes):
    table = purchases([
        ("a", "p1", 10.0, 40),
        ("a", "p2", 5.0, 40),      # same day: one purchase day
        ("a", "p1", 2.5, 3),
        ("a", "p3", 1.0, -2),      # after the as-of day: age 0, counted
    ])
    [chunk], report = pool(table, axes)
    assert report.lines_after_as_of == 1
    spend = chunk.product_spend.toarray()[0]
    assert spend.tolist() == [12.5, 5.0, 1.0]


def test_unsorted_input_is_refused(axes):
    table = purchases([("b", "p1", 1.0, 1), ("a", "p1", 1.0, 1)])
    with pytest.raises(ValueError, match="sorted"):
        pool(table, axes)
    split = purchases([("a", "p1", 1.0, 1), ("b", "p1", 1.0, 1), ("a", "p2", 1.0, 1)])
    with pytest.raises(ValueError, match="sorted"):
        pool(split, axes, batch_rows=1, chunk_lines=1)


def test_timezone_aware_and_date_columns_pool_like_naive_timestamps(axes):
    table = purchases([("a", "p1", 3.0, 10), ("a", "p2", 1.0, 100)])
    naive, _ = pool(table, axes)
    column = table.column("purchased_at")
    aware = table.set_column(3, "purchased_at", column.cast(pa.timestamp("ns", tz="UTC")))
    dated = table.set_column(3, "purchased_at", column.cast(pa.date32()))
    for other in (aware, dated):
        chunks, _ = pool(other, axes)
        np.testing.assert_array_equal(chunks[0].vectors, naive[0].vectors)


def test_product_embeddings_drop_unusable_vectors_and_refuse_duplicate_ids():
    vectors = np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    products = ProductEmbeddings.from_arrays(["a", "b", "c", "d"], vectors)
    assert products.product_ids.to_pylist() == ["a", "d"]
    assert products.dropped_product_ids == ("b", "c")
    np.testing.assert_allclose(products.vectors, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="unique"):
        ProductEmbeddings.from_arrays(["a", "a"], np.eye(2))


def test_product_embeddings_from_an_arrow_table():
    table = pa.table({
        "product_id": ["x", "y"],
        "embedding": pa.array([[3.0, 4.0], [0.0, 1.0]], pa.list_(pa.float32(), 2)),
    })
    products = ProductEmbeddings.from_arrow(table)
    np.testing.assert_allclose(products.vectors, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)


def test_pooling_reads_a_duckdb_arrow_reader_sorted_by_customer(axes):
    """The way the asset feeds it: ORDER BY customer_id, record batches of a configurable size."""
    import duckdb

    table = purchases([
        ("Zoë", "p1", 2.0, 3), ("a", "p2", 1.0, 1), ("é", "p3", 4.0, 2),
        ("a", "p1", 3.0, 8), ("ab", "p3", 1.0, 0), ("Zoë", "p2", 1.0, 40),
    ])
    con = duckdb.connect()
    try:
        con.register("purchases", table)
        reader = con.sql("SELECT * FROM purchases ORDER BY customer_id").to_arrow_reader(2)
        chunks, report = pool(reader, axes, chunk_lines=2)
    finally:
        con.close()
    ids, vectors = concatenated(chunks)
    assert ids == ["Zoë", "a", "ab", "é"] and report.customers_out == 4
    expected, _ = pool(table.sort_by("customer_id"), axes)
    np.testing.assert_array_equal(vectors, concatenated(expected)[1])
