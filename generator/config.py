"""What to generate: sizes, days, seed, and the rate of each kind of real-world fault."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Every fault kind, and the tables where it can occur (rates are per record of that table).
FAULTS_BY_TABLE: dict[str, tuple[str, ...]] = {
    "customers": ("invalid_email", "invalid_uuid", "missing_field", "bad_date", "malformed_json", "duplicate_record"),
    "customer_purchases": ("negative_amount", "non_numeric_amount", "bad_date", "missing_field", "unknown_product_id"),
    "transactions": ("wrong_column_count", "bad_encoding", "duplicate_record", "bad_date", "non_numeric_amount",
                     "negative_amount", "missing_field"),
    "products": ("wrong_column_count", "bad_encoding", "duplicate_record", "missing_field", "non_numeric_amount",
                 "negative_amount"),
}


@dataclass(frozen=True)
class FaultRates:
    """Probability that a record carries each fault (at most one fault per record)."""

    invalid_email: float = 0.0
    invalid_uuid: float = 0.0
    negative_amount: float = 0.0
    non_numeric_amount: float = 0.0
    bad_date: float = 0.0
    missing_field: float = 0.0
    duplicate_record: float = 0.0
    malformed_json: float = 0.0
    unknown_product_id: float = 0.0
    wrong_column_count: float = 0.0
    bad_encoding: float = 0.0

    @classmethod
    def uniform(cls, rate: float) -> FaultRates:
        return cls(**{f.name: rate for f in fields(cls)})

    def for_table(self, table: str) -> dict[str, float]:
        rates = {name: getattr(self, name) for name in FAULTS_BY_TABLE[table]}
        if sum(rates.values()) > 1.0:
            raise ValueError(f"fault rates for {table} add up to more than 1: {rates}")
        return rates


FAULT_TYPES: tuple[str, ...] = tuple(f.name for f in fields(FaultRates))


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and shape of the synthetic landing data; the same config always writes the same bytes."""

    out: Path
    customers: int = 1_000
    days: int = 1
    start: dt.date = dt.date(2011, 9, 1)
    seed: int = 0
    products: int | None = None  # default: customers / 100, between 200 and 20,000
    faults: FaultRates = field(default_factory=FaultRates)
    new_customer_share: float = 0.05  # new customers each later day, as a share of `customers`
    returning_share: float = 0.02  # existing customers who buy again on a given day
    mean_history_items: float = 10.0  # purchase-history items per customer on the first day
    mean_daily_items: float = 3.0  # items a customer buys on one day
    chunk_customers: int = 50_000  # customers rendered at once: bounds memory (~400 MB at 50k)

    @property
    def catalog_size(self) -> int:
        if self.products is not None:
            return self.products
        return int(min(max(self.customers // 100, 200), 20_000))

    @property
    def new_customers_per_day(self) -> int:
        return int(round(self.customers * self.new_customer_share))

    def day(self, index: int) -> dt.date:
        return self.start + dt.timedelta(days=index)

    def to_json(self) -> dict:
        data = asdict(self)
        data["out"] = str(self.out)
        data["start"] = self.start.isoformat()
        return data
