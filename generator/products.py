"""`products/<day>.csv`: the whole catalog on the first day, then new products and re-listings."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np
import pyarrow as pa

from generator import catalog as cat
from generator import csv_lines, text
from generator.config import GeneratorConfig
from generator.faults import FaultLog, draw_faults

LAYOUT = csv_lines.CsvLayout(
    source="products",
    table="products",
    columns=("product_id", "name", "description", "category", "price", "in_stock"),
    can_go_missing=("product_id", "name", "category", "price"),
    numeric=("price",),
    signed=("price",),
    dated=(),
    text="name",
)


def write_products(config: GeneratorConfig, catalog: cat.Catalog, day_index: int, out: BinaryIO,
                   log: FaultLog) -> tuple[int, np.ndarray]:
    """Write the day's catalog file; returns its record count and the products whose row is faulty."""
    index = np.union1d(catalog.introduced_on(day_index), catalog.updated_on(day_index))
    draw = draw_faults(config.seed, "products", config.faults.for_table("products"), day_index, index)
    codes = cat.product_codes(index)
    fields = {
        "product_id": codes,
        "name": cat.product_names(catalog, index),
        "description": text.concat('"', cat.product_descriptions(catalog, index), '"'),
        "category": cat.categories(catalog, index),
        "price": text.numbers(cat.prices_on(catalog, index, day_index), decimals=2),
        "in_stock": pa.array(np.where(cat.in_stock_on(catalog, index, day_index), "true", "false")),
    }
    lines, bad_bytes = csv_lines.render(LAYOUT, fields, draw, config.seed, (day_index, index), codes, 2, log)
    out.write((LAYOUT.header + "\n").encode())
    text.write_lines(out, lines, has_bad_bytes=bad_bytes)
    # A duplicated row still lands once; every other fault keeps the product out of the catalog.
    unusable = index[draw.faulty & ~draw.mask("duplicate_record")]
    return len(lines), unusable
