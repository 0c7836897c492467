"""The synthetic landing data: deterministic, shaped like the seed and Online Retail, faults logged,
and purchases with a taste signal that collaborative filtering can find."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sparse

from generator import FAULT_TYPES, FAULTS_BY_TABLE, FaultRates, GeneratorConfig, generate, landing_paths, manifest_path

START = dt.date(2011, 9, 1)
ROOT = Path(__file__).resolve().parents[1]


def config(out: Path, **options) -> GeneratorConfig:
    return GeneratorConfig(**{"out": out, "customers": 400, "days": 2, "start": START, "seed": 5, **options})


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.*")) if p.name != "summary.json"}


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_config_writes_the_same_bytes(tmp_path):
    faults = FaultRates.uniform(0.01)
    generate(config(tmp_path / "a", faults=faults))
    generate(config(tmp_path / "b", faults=faults))
    generate(config(tmp_path / "c", faults=faults, seed=6))
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")


def test_chunk_size_changes_no_record(tmp_path):
    generate(config(tmp_path / "big", chunk_customers=1_000))
    generate(config(tmp_path / "small", chunk_customers=37))
    for name, content in files(tmp_path / "big").items():
        assert sorted(content.splitlines()) == sorted(files(tmp_path / "small")[name].splitlines()), name


def test_days_carry_the_seed_shape(tmp_path):
    generate(config(tmp_path, customers=1_000, days=3, new_customer_share=0.05))
    first, second = (landing_paths(tmp_path, START + dt.timedelta(days=i)) for i in range(2))
    day_one = json_lines(first["customers"])
    assert len(day_one) == 1_000 and len({c["id"] for c in day_one}) == 1_000
    assert all(set(c) == {"id", "email", "purchaseHistory", "createdAt"} for c in day_one)
    items = [i for c in day_one for i in c["purchaseHistory"]]
    assert 8 <= len(items) / len(day_one) <= 12
    assert all(i["date"] < START.isoformat() and set(i) == {"productId", "amount", "date"} for i in items)
    assert all(c["createdAt"] < min(i["date"] for i in c["purchaseHistory"]) for c in day_one)
    day_two = json_lines(second["customers"])
    new = [c for c in day_two if c["createdAt"] >= (START + dt.timedelta(days=1)).isoformat()]
    assert len(new) == 50 and 0 < len(day_two) - len(new) < 60  # new customers and a few returning ones
    assert all(i["date"].startswith((START + dt.timedelta(days=1)).isoformat()) for c in day_two
               for i in c["purchaseHistory"])


def test_catalog_and_transactions_look_real(tmp_path):
    generate(config(tmp_path, customers=20_000, days=1))
    paths = landing_paths(tmp_path, START)
    with open(paths["products"], newline="") as handle:
        products = list(csv.DictReader(handle))
    assert len(products) == 200  # customers / 100
    assert all(float(p["price"]) > 0 and "," in p["description"] and p["category"] for p in products)
    out_of_stock = sum(p["in_stock"] == "false" for p in products) / len(products)
    assert 0.03 <= out_of_stock <= 0.12
    with open(paths["transactions"], newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert list(lines[0]) == ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice",
                              "CustomerID", "Country"]
    known = {p["product_id"] for p in products}
    assert all(line["StockCode"] in known for line in lines)
    assert all(line["CustomerID"] == "" or line["CustomerID"].endswith(".0") for line in lines)
    assert any(line["InvoiceNo"].startswith("C") and int(line["Quantity"]) < 0 for line in lines)
    assert 0.1 < sum(line["CustomerID"] == "" for line in lines) / len(lines) < 0.3
    assert len(lines) == len({tuple(line.values()) for line in lines})  # no accidental exact duplicates


def test_every_fault_is_logged_where_it_was_injected(tmp_path):
    generate(config(tmp_path, customers=3_000, days=1, faults=FaultRates.uniform(0.03)))
    with open(manifest_path(tmp_path, START)) as handle:
        log = list(csv.DictReader(handle))
    assert {(r["table"], r["fault"]) for r in log} == {(t, f) for t, faults in FAULTS_BY_TABLE.items() for f in faults}
    paths = landing_paths(tmp_path, START)
    raw = {source: path.read_bytes().split(b"\n") for source, path in paths.items()}
    for row in log:
        line = raw[row["source"]][int(row["line_no"]) - 1]
        if row["fault"] == "malformed_json":
            with pytest.raises(ValueError):
                json.loads(line)
        elif row["fault"] == "bad_encoding":
            with pytest.raises(UnicodeDecodeError):
                line.decode("utf-8")
        elif row["fault"] == "wrong_column_count":
            assert len(next(csv.reader([line.decode()]))) != 6 + 2 * (row["source"] == "transactions")
        elif row["fault"] == "invalid_email":
            assert json.loads(line)["email"].count("@") != 1 or json.loads(line)["email"].endswith("@")
        elif row["fault"] == "duplicate_record":
            assert raw[row["source"]].count(line) == 2
        elif row["table"] == "customer_purchases":
            item = json.loads(line)["purchaseHistory"][int(row["item_no"])]
            assert row["field"] not in item if row["fault"] == "missing_field" else row["field"] in item


def test_fault_rates_must_be_probabilities():
    with pytest.raises(ValueError, match="more than 1"):
        FaultRates.uniform(0.2).for_table("transactions")
    assert set(FAULT_TYPES) == {f.name for f in dataclasses.fields(FaultRates)}


def test_collaborative_filtering_beats_popularity_on_held_out_purchases(tmp_path):
    """Hold out each customer's last purchase; item co-occurrence must find it far more often than
    the globally most popular products do."""
    generate(config(tmp_path, customers=3_000, days=1))
    customers = json_lines(landing_paths(tmp_path, START)["customers"])
    products = sorted({i["productId"] for c in customers for i in c["purchaseHistory"]})
    column = {p: n for n, p in enumerate(products)}
    rows, cols, held_out = [], [], []
    for n, customer in enumerate(customers):
        history = sorted(customer["purchaseHistory"], key=lambda i: i["date"])
        if len(history) >= 3:
            rows += [n] * (len(history) - 1)
            cols += [column[i["productId"]] for i in history[:-1]]
            held_out.append((n, column[history[-1]["productId"]]))
    bought = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(customers), len(products)))
    bought.data[:] = 1.0
    popularity = np.asarray(bought.sum(axis=0)).ravel()
    together = (bought.T @ bought).tolil()
    together.setdiag(0)
    scores = (bought @ together.tocsr()).toarray() / np.sqrt(np.maximum(popularity, 1.0))
    top_popular = set(np.argsort(-popularity)[:10])
    cf_hits = np.mean([p in set(np.argsort(-scores[n])[:10]) for n, p in held_out])
    popular_hits = np.mean([p in top_popular for _, p in held_out])
    assert cf_hits > 1.5 * popular_hits and cf_hits > 0.25


def test_cli_writes_the_landing_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "generator", "--out", str(tmp_path), "--customers", "120", "--days", "2",
         "--start", "2011-09-01", "--seed", "1", "--fault-rate", "0.01", "--invalid-email", "0.05"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [d["day"] for d in report["days"]] == ["2011-09-01", "2011-09-02"]
    summary = json.loads((tmp_path / "_manifest" / "summary.json").read_text())
    assert summary["config"]["faults"]["invalid_email"] == 0.05 and summary["config"]["faults"]["bad_date"] == 0.01
    assert summary["days"][0]["faults"]["customers"]["invalid_email"] > 0
    assert (tmp_path / "products" / "2011-09-02.csv").exists()
