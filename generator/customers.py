"""`customers/<day>.jsonl` in the seed's shape, built with Arrow string kernels a chunk at a time.

    {"id": "<uuid>", "email": "...", "purchaseHistory": [{"productId": "...", "amount": 12.5,
     "date": "2011-08-14T10:22:00.000Z"}], "createdAt": "2010-03-02T09:12:44.000Z"}

A missing field is a left-out key; a malformed line is still one line (a parser must resync);
a duplicate record is the same line sent again at the end of its chunk.
"""

from __future__ import annotations

import datetime as dt
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from generator import catalog as cat
from generator import text
from generator.config import GeneratorConfig
from generator.faults import FaultDraw, FaultLog, draw_faults, variant
from generator.purchases import Purchases
from generator.randomness import hash64, integers, uniform
from generator.vocab import EMAIL_DOMAINS, FIRST_NAMES, LAST_NAMES

ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.000Z"  # JavaScript's Date.toISOString()
BAD_DATES = ["2011-02-30T10:00:00.000Z", "31/12/2011", "yesterday", "2011-13-01T09:00:00.000Z", ""]
NON_NUMERIC = ["12,50", "N/A", "£4.50", "free", "4.5O"]
CUSTOMER_FIELDS = ("id", "email", "purchaseHistory", "createdAt")
ITEM_FIELDS = ("productId", "amount", "date")
RECORD_FAULT_FIELD = {"invalid_email": "email", "invalid_uuid": "id", "bad_date": "createdAt",
                      "duplicate_record": "id"}
ITEM_FAULT_FIELD = {"negative_amount": "amount", "non_numeric_amount": "amount", "bad_date": "date",
                    "unknown_product_id": "productId"}


def customer_ids(seed: int, customers: np.ndarray) -> pa.Array:
    bits = np.stack([hash64(seed, "customer:uuid:hi", customers), hash64(seed, "customer:uuid:lo", customers)], axis=1)
    return text.hex_ids(bits)


def emails(seed: int, customers: np.ndarray) -> pa.Array:
    first = text.words(FIRST_NAMES, integers(seed, "customer:first", len(FIRST_NAMES), customers))
    last = text.words(LAST_NAMES, integers(seed, "customer:last", len(LAST_NAMES), customers))
    number = text.numbers(integers(seed, "customer:number", 100, customers))
    domain = text.words(EMAIL_DOMAINS, integers(seed, "customer:domain", len(EMAIL_DOMAINS), customers))
    return text.concat(first, ".", last, number, "@", domain)


def created_at(config: GeneratorConfig, customers: np.ndarray) -> np.ndarray:
    """Sign-up time (epoch seconds): long before the first day for the initial customers, on the
    morning of their first day for those who join later."""
    start = _epoch(config.start)
    u = uniform(config.seed, "customer:created", customers)
    initial = start - 400 * 86_400 - np.floor(u * 1_000 * 86_400).astype(np.int64)
    joined_day = 1 + (customers - config.customers) // max(config.new_customers_per_day, 1)
    joined = start + joined_day * 86_400 + np.floor(u * 8 * 3_600).astype(np.int64)
    return np.where(customers < config.customers, initial, joined)


def write_customers_chunk(out: BinaryIO, config: GeneratorConfig, day_index: int, customers: np.ndarray,
                          purchases: Purchases, first_line: int, log: FaultLog) -> int:
    """Append the chunk's JSON lines; returns the number of lines written."""
    seed = config.seed
    record = draw_faults(seed, "customers", config.faults.for_table("customers"), day_index, customers)
    item = draw_faults(seed, "customer_purchases", config.faults.for_table("customer_purchases"),
                       day_index, purchases.customer, purchases.item_no)
    # Items of a record that is itself faulty are never validated: keep them clean.
    item = FaultDraw(item.names, np.where(np.repeat(record.faulty, purchases.counts), 0, item.codes).astype(np.int8))
    ids = customer_ids(seed, customers)
    items, item_fields = _items_json(seed, day_index, purchases, item)
    history = pc.binary_join(pa.ListArray.from_arrays(_offsets(purchases.counts), items), ",")
    del items
    lines, record_fields = _customer_lines(config, day_index, customers, ids, history, record)
    del history
    text.write_lines(out, lines)
    duplicated = np.flatnonzero(record.mask("duplicate_record"))
    text.write_lines(out, lines.take(pa.array(duplicated)))
    line_of_record = first_line + np.arange(len(customers))
    line_of_record[duplicated] = first_line + len(customers) + np.arange(len(duplicated))  # the copy is the fault
    _log_faults(log, record, item, ids, line_of_record, purchases, record_fields, item_fields)
    return len(customers) + len(duplicated)


def _items_json(seed: int, day_index: int, purchases: Purchases, draw: FaultDraw) -> tuple[pa.Array, np.ndarray]:
    keys = (day_index, purchases.customer, purchases.item_no)
    product = text.patch(cat.product_codes(purchases.product), draw.mask("unknown_product_id"), lambda rows: text.numbers(
        cat.UNKNOWN_PRODUCT_CODE + variant(seed, "customer_purchases", "unknown", 99_999, *_rows(keys, rows))))
    amount = text.numbers(purchases.amount, decimals=2)
    amount = text.patch(amount, draw.mask("negative_amount"), lambda rows: text.concat("-", amount.take(rows)))
    amount = text.patch(amount, draw.mask("non_numeric_amount"), lambda rows: text.concat('"', _pick(
        NON_NUMERIC, variant(seed, "customer_purchases", "non_numeric", len(NON_NUMERIC), *_rows(keys, rows))), '"'))
    date = text.patch(text.timestamps(purchases.at, ISO_FORMAT), draw.mask("bad_date"), lambda rows: _pick(
        BAD_DATES, variant(seed, "customer_purchases", "bad_date", len(BAD_DATES), *_rows(keys, rows))))
    items = text.concat('{"productId":"', product, '","amount":', amount, ',"date":"', date, '"}')
    fields = _fault_fields(draw, ITEM_FAULT_FIELD)
    missing = draw.mask("missing_field")
    segments = {"productId": ('"productId":"', product, '"'), "amount": ('"amount":', amount),
                "date": ('"date":"', date, '"')}
    items = text.patch(items, missing, lambda rows: _without_one_field(
        segments, rows, variant(seed, "customer_purchases", "missing_field", 3, *_rows(keys, rows)), fields))
    return items, fields


def _customer_lines(config: GeneratorConfig, day_index: int, customers: np.ndarray, ids: pa.Array,
                    history: pa.Array, draw: FaultDraw) -> tuple[pa.Array, np.ndarray]:
    seed = config.seed
    keys = (day_index, customers)
    shown_ids = text.patch(ids, draw.mask("invalid_uuid"), lambda rows: _broken_ids(
        ids.take(rows), variant(seed, "customers", "invalid_uuid", 3, *_rows(keys, rows))))
    email = emails(seed, customers)
    email = text.patch(email, draw.mask("invalid_email"), lambda rows: _broken_emails(
        email.take(rows), variant(seed, "customers", "invalid_email", 3, *_rows(keys, rows))))
    created = text.patch(text.timestamps(created_at(config, customers), ISO_FORMAT), draw.mask("bad_date"),
                         lambda rows: _pick(BAD_DATES, variant(seed, "customers", "bad_date", len(BAD_DATES),
                                                               *_rows(keys, rows))))
    lines = text.concat('{"id":"', shown_ids, '","email":"', email, '","purchaseHistory":[', history,
                        '],"createdAt":"', created, '"}\n')
    fields = _fault_fields(draw, RECORD_FAULT_FIELD)
    segments = {"id": ('"id":"', shown_ids, '"'), "email": ('"email":"', email, '"'),
                "purchaseHistory": ('"purchaseHistory":[', history, "]"), "createdAt": ('"createdAt":"', created, '"')}
    lines = text.patch(lines, draw.mask("missing_field"), lambda rows: text.concat(_without_one_field(
        segments, rows, variant(seed, "customers", "missing_field", 4, *_rows(keys, rows)), fields), "\n"))
    lines = text.patch(lines, draw.mask("malformed_json"), lambda rows: _malformed(
        lines.take(rows), variant(seed, "customers", "malformed_json", 3, *_rows(keys, rows))))
    return lines, fields


def _without_one_field(segments: dict[str, tuple], rows: np.ndarray, dropped: np.ndarray,
                       fields: np.ndarray) -> pa.Array:
    """The JSON object of the rows with one key left out (`dropped` is its position)."""
    parts = []
    for position, (name, pieces) in enumerate(segments.items()):
        segment = text.concat(*(p.take(rows) if isinstance(p, pa.Array) else p for p in pieces))
        parts.append(text.patch(segment, dropped == position, lambda r: pa.nulls(len(r), pa.string())))
        fields[rows[dropped == position]] = name
    return text.concat("{", text.join_fields(*parts), "}")


def _broken_ids(ids: pa.Array, kind: np.ndarray) -> pa.Array:
    truncated = pc.utf8_slice_codeunits(ids, 0, 30)
    not_hex = text.concat("z", pc.utf8_slice_codeunits(ids, 1, 36))
    no_dashes = pc.replace_substring(ids, "-", "")
    return pc.if_else(pa.array(kind == 0), truncated, pc.if_else(pa.array(kind == 1), not_hex, no_dashes))


def _broken_emails(email: pa.Array, kind: np.ndarray) -> pa.Array:
    no_at = pc.replace_substring(email, "@", " at ")
    double_at = pc.replace_substring(email, "@", "@@")
    no_domain = pc.replace_substring_regex(email, "@.*$", "@")
    return pc.if_else(pa.array(kind == 0), no_at, pc.if_else(pa.array(kind == 1), double_at, no_domain))


def _malformed(lines: pa.Array, kind: np.ndarray) -> pa.Array:
    """Truncated lines, a lost quote, single quotes: the usual ways JSON breaks in transit."""
    truncated = text.concat(pc.utf8_slice_codeunits(lines, 0, -2), "\n")  # loses the closing brace
    lost_quote = pc.replace_substring(lines, '":"', '":', max_replacements=1)
    single_quotes = pc.replace_substring(lines, '"', "'")
    return pc.if_else(pa.array(kind == 0), truncated, pc.if_else(pa.array(kind == 1), lost_quote, single_quotes))


def _fault_fields(draw: FaultDraw, field_of_fault: dict[str, str]) -> np.ndarray:
    """The source field each record's fault touches ("" for whole-line faults)."""
    return np.array([""] + [field_of_fault.get(name, "") for name in draw.names], dtype=object)[draw.codes]


def _log_faults(log: FaultLog, record: FaultDraw, item: FaultDraw, ids: pa.Array, line_of_record: np.ndarray,
                purchases: Purchases, record_fields: np.ndarray, item_fields: np.ndarray) -> None:
    faulty = record.faulty
    log.add("customers", "customers", line_of_record[faulty], ids.filter(pa.array(faulty)),
            record.labels()[faulty], record_fields[faulty])
    faulty_items = item.faulty
    owner = np.repeat(np.arange(len(line_of_record)), purchases.counts)[faulty_items]
    log.add("customers", "customer_purchases", line_of_record[owner], ids.take(pa.array(owner)),
            item.labels()[faulty_items], item_fields[faulty_items], item_no=purchases.item_no[faulty_items])


def _pick(choices: list[str], index: np.ndarray) -> pa.Array:
    return text.words(choices, index)


def _rows(keys: tuple, rows: np.ndarray) -> tuple:
    """The draw keys of some rows (scalar keys such as the day stay as they are)."""
    return tuple(k[rows] if isinstance(k, np.ndarray) else k for k in keys)


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))


def _epoch(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())
