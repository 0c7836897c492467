"""The source registry: every landing source, declared once.

Ingestion (its assets, readers and raw tables), the landing resource's default paths, the SQL
models' table owners, the GX checks, the freshness sensor and the monitoring watch lists all derive
from `SOURCES`. Adding a source is one `Source` entry here, plus its suite in `expectations/`
(one per raw table) and the `sql/` models that read it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RawTable:
    """A raw table: its landed columns (after partition_date, line_no) and its record key.

    `name` is also the name of its GX suite (`expectations/<name>.json`) and of
    `ops.schema_errors.table_name`.
    """

    name: str
    columns: dict[str, str]
    record_key: str  # SQL over the staged columns: how a quarantined record is named
    landed: dict[str, str] = field(default_factory=dict)  # SQL of a column as it lands, when not a plain cast
    # Columns that hold personal data, and how they leave the warehouse (previews, check metadata,
    # alerts, logs): "mask" (c***@example.com) or "hash" (a stable pseudonym, still a join key).
    personal: dict[str, str] = field(default_factory=dict)
    # SQL of a staged column as the rules judge it and as it lands, `{value}` standing for the text
    # as it arrived: e.g. UUIDs in lower case, so that uniqueness ignores case.
    normalized: dict[str, str] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"raw.{self.name}"


DEFAULT_CURRENCY = "GBP"  # Online Retail's pounds sterling, and the generator's unit
CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")


class CurrencyError(ValueError):
    """Sources disagree on their currency, or a configured code is not ISO 4217-shaped."""


@dataclass(frozen=True)
class Source:
    """One landing source: a file a day, read by `reader`, landing in `tables` (the first holds its
    records; later ones hold parts of them, such as a customer's purchase items)."""

    name: str
    reader: str  # a reader of assets/ingest/landing_files.py: "csv" or "customer_jsonl"
    landing_pattern: str  # default path of a day's file under the landing root; {date} = YYYY-MM-DD
    fields: dict[str, str]  # field name in the file -> raw column
    tables: tuple[RawTable, ...]
    description: str
    deps: tuple[str, ...] = ()  # assets that must land first (customers are judged against the catalog)
    # Timestamps written without an offset are in this zone (IANA name); every timestamp lands in UTC.
    naive_timezone: str = "UTC"
    # Timestamps written another way than ISO 8601 (e.g. "%m/%d/%Y %H:%M"): set per deployment on
    # the landing zone (LANDING_<SOURCE>_TIMESTAMP_FORMAT), which ingestion copies here.
    timestamp_format: str | None = None
    # Files written in a single-byte encoding (latin-1, cp1252), not UTF-8: set on the landing zone
    # (LANDING_<SOURCE>_ENCODING) and copied here, like the timestamp format.
    encoding: str | None = None
    # JSON sources: accept a string holding a number ("12.5") where a number is expected. Off by
    # default: a string amount is quarantined as `amount_not_a_number`, never silently cast.
    numeric_strings: bool = False
    # The source's money amounts (prices, purchase amounts) are in this currency (ISO 4217), unless
    # `<NAME>_CURRENCY` or `PIPELINE_CURRENCY` says otherwise; None: the source carries no money.
    currency: str | None = DEFAULT_CURRENCY

    @property
    def asset(self) -> str:
        return f"raw_{self.name}"

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(table.name for table in self.tables)


PRODUCTS = Source(
    name="products",
    reader="csv",
    landing_pattern="products/{date}.csv",
    fields={"product_id": "product_id", "name": "name", "description": "description", "category": "category",
            "price": "price", "in_stock": "in_stock"},
    tables=(RawTable(
        "products",
        {"product_id": "VARCHAR", "name": "VARCHAR", "description": "VARCHAR", "category": "VARCHAR",
         "price": "DOUBLE", "in_stock": "BOOLEAN"},
        "coalesce(product_id, 'line ' || line_no)",
    ),),
    description="The day's product catalog rows -> raw.products (invalid rows -> ops.schema_errors).",
)

CUSTOMERS = Source(
    name="customers",
    reader="customer_jsonl",
    landing_pattern="customers/{date}.jsonl",
    fields={"id": "customer_id", "email": "email", "createdAt": "created_at", "purchaseHistory": "purchase_count",
            "productId": "product_id", "amount": "amount", "date": "purchased_at"},
    tables=(
        RawTable(
            "customers",
            {"customer_id": "VARCHAR", "email": "VARCHAR", "created_at": "TIMESTAMP", "purchase_count": "INTEGER"},
            "coalesce(customer_id, 'line ' || line_no)",
            personal={"email": "mask", "customer_id": "hash"},
            # UUIDs are case-insensitive (RFC 9562): compared and landed in lower case.
            normalized={"customer_id": "lower({value})"},
        ),
        RawTable(
            "customer_purchases",
            {"item_no": "INTEGER", "customer_id": "VARCHAR", "product_id": "VARCHAR", "amount": "DOUBLE",
             "purchased_at": "TIMESTAMP"},
            "customer_id || '#' || item_no",
            personal={"customer_id": "hash"},
        ),
    ),
    description="The day's customer records (JSON Lines) -> raw.customers and their purchase items -> "
    "raw.customer_purchases; unknown products are checked against the catalog up to the day.",
    deps=("raw_products",),
)

TRANSACTIONS = Source(
    name="transactions",
    reader="csv",
    landing_pattern="transactions/{date}.csv",
    fields={"InvoiceNo": "invoice_no", "StockCode": "stock_code", "Description": "description",
            "Quantity": "quantity", "InvoiceDate": "invoice_date", "UnitPrice": "unit_price",
            "CustomerID": "customer_id", "Country": "country"},
    tables=(RawTable(
        "transactions",
        {"invoice_no": "VARCHAR", "stock_code": "VARCHAR", "description": "VARCHAR", "quantity": "INTEGER",
         "invoice_date": "TIMESTAMP", "unit_price": "DOUBLE", "customer_id": "VARCHAR", "country": "VARCHAR"},
        "coalesce(invoice_no, '?') || '/' || coalesce(stock_code, '?') || ' line ' || line_no",
        # Online Retail writes CustomerID as a float ('17850.0'); it lands as the integer text.
        landed={"customer_id": "regexp_replace(customer_id, '\\.0+$', '')"},
        personal={"customer_id": "hash"},
    ),),
    description="The day's order lines (UCI Online Retail layout) -> raw.transactions.",
)

SOURCES: tuple[Source, ...] = (PRODUCTS, CUSTOMERS, TRANSACTIONS)


def by_name(sources: tuple[Source, ...] = SOURCES) -> dict[str, Source]:
    return {source.name: source for source in sources}


def raw_table_owners(sources: tuple[Source, ...] = SOURCES) -> dict[str, str]:
    """raw.<table> -> the ingestion asset that writes it."""
    return {table.qualified: source.asset for source in sources for table in source.tables}


def ingestion_assets(sources: tuple[Source, ...] = SOURCES) -> list[str]:
    return [source.asset for source in sources]


def personal_columns(sources: tuple[Source, ...] = SOURCES) -> dict[str, str]:
    """Column name -> how it is masked, for every personal column of the registry (the same name
    downstream, such as customer_id in the SQL models and AI tables, is masked the same way)."""
    return {column: how for source in sources for table in source.tables for column, how in table.personal.items()}


def configured_sources(sources: tuple[Source, ...] = SOURCES) -> tuple[Source, ...]:
    """The sources this deployment lands (`PIPELINE_SOURCES`, comma-separated; default: all). A
    day is complete when all of them have landed; a transactions-only set-up is neither waiting
    for nor late on customers it never receives."""
    wanted = [name.strip() for name in os.getenv("PIPELINE_SOURCES", "").split(",") if name.strip()]
    unknown = sorted(set(wanted) - {source.name for source in sources})
    if unknown:  # a typo would leave no source to wait for: every day complete, nothing landed
        raise ValueError(f"PIPELINE_SOURCES names unknown sources {unknown}; the sources are "
                         f"{[source.name for source in sources]}")
    chosen = tuple(source for source in sources if not wanted or source.name in wanted)
    by_asset = {source.asset: source for source in sources}
    for source in chosen:
        needed = [by_asset[dep].name for dep in source.deps if dep in by_asset and by_asset[dep] not in chosen]
        if needed:  # its records would all be judged against an empty catalog and quarantined
            raise ValueError(f"PIPELINE_SOURCES: {source.name} is judged against {needed} (unknown ids are "
                             f"quarantined), which the deployment does not receive; add {', '.join(needed)}")
    return chosen


def currency_of(source: Source) -> str | None:
    """The source's currency: `<NAME>_CURRENCY`, else `PIPELINE_CURRENCY`, else its declaration."""
    if source.currency is None:
        return None
    code = (os.getenv(f"{source.name.upper()}_CURRENCY") or os.getenv("PIPELINE_CURRENCY") or source.currency)
    code = code.strip().upper()
    if not CURRENCY_CODE.match(code):
        raise CurrencyError(f"{source.name}: currency {code!r} is not a 3-letter ISO 4217 code "
                            f"(set {source.name.upper()}_CURRENCY or PIPELINE_CURRENCY, e.g. GBP)")
    return code


def purchases_currency(sources: tuple[Source, ...] | None = None) -> str:
    """The one currency of the purchase amounts the AI stages learn spend from. Amounts in two
    currencies would be summed as if they were one: refuse, and say which source says what."""
    found = {source.name: currency_of(source) for source in (sources or configured_sources())}
    codes = {code for code in found.values() if code}
    if len(codes) > 1:
        listed = ", ".join(f"{name}: {code}" for name, code in sorted(found.items()) if code)
        raise CurrencyError(f"the sources' amounts are in different currencies ({listed}); convert them to one "
                            "before landing, or correct <SOURCE>_CURRENCY / PIPELINE_CURRENCY")
    return codes.pop() if codes else DEFAULT_CURRENCY
