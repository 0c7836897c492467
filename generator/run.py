"""Day by day, chunk by chunk: the three landing files of each day and the log of injected faults.

Day 1 carries every initial customer with a purchase history dated before it. Each later day
carries the customers who joined that day and the returning customers who bought again, with the
purchases of that day. Transactions (Online Retail layout) are the order lines of each day's
buyers. Memory stays bounded by `chunk_customers`, whatever the number of customers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from generator import customers as cust
from generator import products, transactions
from generator.catalog import Catalog, build_catalog
from generator.config import GeneratorConfig
from generator.faults import FaultLog
from generator.purchases import Purchases, TasteModel, build_purchases, item_counts
from generator.randomness import uniform

HISTORY_KEY = 1_000_000  # the draws of the first day's history, apart from any day's draws
HISTORY_DAYS = 365
SHOP_OPENS_SECONDS = 8 * 3_600
SHOP_HOURS_SECONDS = 12 * 3_600


@dataclass
class DaySummary:
    day: str
    records: dict[str, int] = field(default_factory=dict)  # per landing file
    purchase_items: int = 0
    faults: dict[str, dict[str, int]] = field(default_factory=dict)  # per table, per fault type


@dataclass
class GenerationSummary:
    config: GeneratorConfig
    days: list[DaySummary]
    seconds: float

    def to_json(self) -> dict:
        return {"config": self.config.to_json(), "seconds": round(self.seconds, 2),
                "days": [vars(d) for d in self.days]}


def landing_paths(out: Path, day: dt.date) -> dict[str, Path]:
    """Where each landing file of a day goes (the default patterns of resources.landing)."""
    name = day.isoformat()
    return {"products": out / "products" / f"{name}.csv", "customers": out / "customers" / f"{name}.jsonl",
            "transactions": out / "transactions" / f"{name}.csv"}


def manifest_path(out: Path, day: dt.date) -> Path:
    return out / "_manifest" / "faults" / f"{day.isoformat()}.csv"


def generate(config: GeneratorConfig) -> GenerationSummary:
    """Write `config.days` days of landing files under `config.out`; deterministic for a config."""
    started = time.perf_counter()
    catalog = build_catalog(config)
    model: TasteModel | None = None
    next_invoice = transactions.FIRST_INVOICE
    summaries = []
    for day_index in range(config.days):
        day = config.day(day_index)
        paths = landing_paths(config.out, day)
        log = FaultLog()
        summary = DaySummary(day.isoformat())
        with _landing(paths["products"]) as out:
            summary.records["products"], unusable = products.write_products(config, catalog, day_index, out, log)
        if model is None:
            model = TasteModel(config.seed, catalog, np.isin(np.arange(catalog.initial_size), unusable))
        next_invoice = _write_people(config, catalog, model, day_index, paths, next_invoice, log, summary)
        log.write(manifest_path(config.out, day))
        summary.faults = log.counts()
        summaries.append(summary)
    result = GenerationSummary(config, summaries, time.perf_counter() - started)
    summary_path = config.out / "_manifest" / "summary.json"
    summary_path.write_text(json.dumps(result.to_json(), indent=2))
    return result


def _write_people(config: GeneratorConfig, catalog: Catalog, model: TasteModel, day_index: int,
                  paths: dict[str, Path], next_invoice: int, log: FaultLog, summary: DaySummary) -> int:
    """The customers and transactions files of a day, a chunk of customers at a time."""
    customer_lines, transaction_lines = 0, 1  # the transactions file starts with its header
    with _landing(paths["customers"]) as people, _landing(paths["transactions"]) as orders:
        orders.write(transactions.header())
        for chunk in _chunks(config, day_index):
            jsonl_customers, jsonl_purchases = _customer_records(config, catalog, model, day_index, chunk)
            customer_lines += cust.write_customers_chunk(people, config, day_index, jsonl_customers, jsonl_purchases,
                                                         customer_lines + 1, log)
            summary.purchase_items += len(jsonl_purchases.product)
            buyers, bought = _buyers_of_the_day(config, catalog, model, day_index, chunk)
            written, invoices = transactions.write_transactions_chunk(orders, config, catalog, day_index, bought,
                                                                      buyers, next_invoice, transaction_lines + 1, log)
            transaction_lines += written
            next_invoice += invoices
    summary.records["customers"] = customer_lines
    summary.records["transactions"] = transaction_lines - 1
    return next_invoice


def _chunks(config: GeneratorConfig, day_index: int) -> Iterator[np.ndarray]:
    """Customer indices that may appear on the day (all who exist by then), in bounded chunks."""
    existing = config.customers + config.new_customers_per_day * day_index
    for start in range(0, existing, config.chunk_customers):
        yield np.arange(start, min(start + config.chunk_customers, existing), dtype=np.int64)


def _customer_records(config: GeneratorConfig, catalog: Catalog, model: TasteModel, day_index: int,
                      chunk: np.ndarray) -> tuple[np.ndarray, Purchases]:
    """Day 1: every initial customer with their history. Later days: the day's buyers."""
    if day_index > 0:
        return _buyers_of_the_day(config, catalog, model, day_index, chunk)
    counts = item_counts(config.seed, "count:history", config.mean_history_items, chunk)
    first = _day_start(config, 0) - HISTORY_DAYS * 86_400
    return chunk, build_purchases(model, catalog, chunk, counts, HISTORY_KEY, first, HISTORY_DAYS * 86_400)


def _buyers_of_the_day(config: GeneratorConfig, catalog: Catalog, model: TasteModel, day_index: int,
                       chunk: np.ndarray) -> tuple[np.ndarray, Purchases]:
    """Customers who joined on the day, and returning customers who buy again, with their purchases."""
    first_joiner = config.customers + config.new_customers_per_day * (day_index - 1)
    joined_today = (chunk >= first_joiner) if day_index > 0 else np.zeros(len(chunk), dtype=bool)
    returning = uniform(config.seed, "customer:returns", day_index, chunk) < config.returning_share
    buyers = chunk[joined_today | returning]
    counts = item_counts(config.seed, "count:day", config.mean_daily_items, day_index, buyers)
    first = _day_start(config, day_index) + SHOP_OPENS_SECONDS
    return buyers, build_purchases(model, catalog, buyers, counts, day_index, first, SHOP_HOURS_SECONDS)


def _day_start(config: GeneratorConfig, day_index: int) -> int:
    day = config.day(day_index)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


@contextmanager
def _landing(path: Path) -> Iterator[BinaryIO]:
    """Write next to the target and rename at the end: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as out:
        yield out
    os.replace(partial, path)
