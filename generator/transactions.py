"""`transactions/<day>.csv` in the UCI Online Retail layout: one invoice per customer and day.

Like the real data, about a fifth of the invoices have no CustomerID (guest checkouts) and a few
are cancellations (`C` invoice, negative quantity); those are legitimate records, not faults.
"""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from generator import catalog as cat
from generator import csv_lines, text
from generator.config import GeneratorConfig
from generator.faults import FaultLog, draw_faults
from generator.purchases import Purchases
from generator.randomness import uniform
from generator.vocab import COUNTRIES, COUNTRY_WEIGHTS

LAYOUT = csv_lines.CsvLayout(
    source="transactions",
    table="transactions",
    columns=("InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country"),
    can_go_missing=("InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "UnitPrice", "Country"),
    numeric=("Quantity", "UnitPrice"),
    signed=("UnitPrice",),
    dated=("InvoiceDate",),
    text="Description",
)
FIRST_INVOICE = 536_365
FIRST_CUSTOMER_NUMBER = 12_346
GUEST_SHARE = 0.2
CANCELLATION_SHARE = 0.02


def write_transactions_chunk(out: BinaryIO, config: GeneratorConfig, catalog: cat.Catalog, day_index: int,
                             purchases: Purchases, customers: np.ndarray, first_invoice: int, first_line: int,
                             log: FaultLog) -> tuple[int, int]:
    """Append one invoice per customer of the chunk; returns (lines written, invoices used)."""
    seed = config.seed
    invoice, product, quantity = _merged_lines(purchases, customers, catalog.size)
    invoice_no = first_invoice + invoice
    who = customers[invoice]
    cancelled = uniform(seed, "transactions:cancel", day_index, who) < CANCELLATION_SHARE
    guest = uniform(seed, "customer:guest", who) < GUEST_SHARE
    first_item = np.cumsum(purchases.counts) - purchases.counts
    country = np.searchsorted(np.cumsum(COUNTRY_WEIGHTS), uniform(seed, "customer:country", who) * sum(COUNTRY_WEIGHTS))
    invoice_text = text.numbers(invoice_no)
    fields = {
        "InvoiceNo": text.patch(invoice_text, cancelled, lambda rows: text.concat("C", invoice_text.take(rows))),
        "StockCode": cat.product_codes(product),
        "Description": pc.utf8_upper(cat.product_names(catalog, product)),
        "Quantity": text.numbers(np.where(cancelled, -quantity, quantity)),
        "InvoiceDate": text.timestamps(purchases.at[first_item][invoice], "%Y-%m-%d %H:%M:%S"),
        "UnitPrice": text.numbers(catalog.base_price[product], decimals=2),
        "CustomerID": text.patch(text.concat(text.numbers(FIRST_CUSTOMER_NUMBER + who), ".0"), guest,
                                 lambda rows: pa.array([""] * len(rows))),
        "Country": text.words(COUNTRIES, np.minimum(country, len(COUNTRIES) - 1)),
    }
    draw = draw_faults(seed, "transactions", config.faults.for_table("transactions"), day_index, invoice_no, product)
    lines, bad_bytes = csv_lines.render(LAYOUT, fields, draw, seed, (day_index, invoice_no, product),
                                        fields["InvoiceNo"], first_line, log)
    text.write_lines(out, lines, has_bad_bytes=bad_bytes)
    return len(lines), len(customers)


def _merged_lines(purchases: Purchases, customers: np.ndarray, catalog_size: int) -> tuple[np.ndarray, ...]:
    """One line per (invoice, product): a product bought twice the same day is one line with the
    summed quantity, so the file has no accidental exact duplicates."""
    invoice = np.repeat(np.arange(len(customers)), purchases.counts)
    key = invoice.astype(np.int64) * catalog_size + purchases.product
    unique_key, inverse = np.unique(key, return_inverse=True)
    quantity = np.bincount(inverse, weights=purchases.quantity).astype(np.int64)
    return unique_key // catalog_size, unique_key % catalog_size, quantity


def header() -> bytes:
    return (LAYOUT.header + "\n").encode()
