"""CSV lines with injected faults, shared by the products and transactions files."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from generator import text
from generator.faults import FaultDraw, FaultLog, variant

NON_NUMERIC = ["N/A", "TBC", "£4.50", "4.5O", "free"]
BAD_DATES = ["2011-02-30 10:00:00", "31/12/2011 10:00", "yesterday", "2011-13-01 09:00:00", "0000-00-00 00:00:00"]


@dataclass(frozen=True)
class CsvLayout:
    """The columns of a file and which of them each field-level fault may hit."""

    source: str
    table: str
    columns: tuple[str, ...]
    can_go_missing: tuple[str, ...]
    numeric: tuple[str, ...]  # may become non-numeric
    signed: tuple[str, ...]  # may become negative (where negative is never legitimate)
    dated: tuple[str, ...]
    text: str  # where invalid bytes go

    @property
    def header(self) -> str:
        return ",".join(self.columns)


def render(layout: CsvLayout, fields: dict[str, pa.Array], draw: FaultDraw, seed: int,
           keys: tuple, record_key: pa.Array, first_line: int, log: FaultLog) -> tuple[pa.Array, bool]:
    """Lines ending in a newline (duplicated rows sent again at the end) and whether any line
    needs invalid bytes. Every injected fault goes to the log with the line it ends up on."""
    fields = dict(fields)
    touched = np.full(len(record_key), "", dtype=object)
    for fault, candidates, bad_values in [
        ("missing_field", layout.can_go_missing, [""]),
        ("non_numeric_amount", layout.numeric, NON_NUMERIC),
        ("bad_date", layout.dated, BAD_DATES),
        ("negative_amount", layout.signed, None),
    ]:
        _corrupt_fields(layout, fields, draw, seed, keys, fault, candidates, bad_values, touched)
    bad_bytes = draw.mask("bad_encoding")
    fields[layout.text] = text.patch(fields[layout.text], bad_bytes,
                                     lambda rows: text.concat(text.BAD_BYTE_MARKER, fields[layout.text].take(rows)))
    line = text.concat(text.join_fields(*(fields[c] for c in layout.columns)), "\n")
    line = _wrong_column_count(layout, line, fields, draw, seed, keys)
    duplicated = np.flatnonzero(draw.mask("duplicate_record"))
    line_of_row = first_line + np.arange(len(line))
    line_of_row[duplicated] = first_line + len(line) + np.arange(len(duplicated))  # the copy is the fault
    faulty = draw.faulty
    log.add(layout.source, layout.table, line_of_row[faulty], record_key.filter(pa.array(faulty)),
            draw.labels()[faulty], touched[faulty])
    lines = pa.concat_arrays([line, line.take(pa.array(duplicated))]) if len(duplicated) else line
    return lines, bool(bad_bytes.any())


def _corrupt_fields(layout: CsvLayout, fields: dict, draw: FaultDraw, seed: int, keys: tuple, fault: str,
                    candidates: tuple[str, ...], bad_values: list[str] | None, touched: np.ndarray) -> None:
    """Spread a field-level fault over its candidate columns; `None` values mean "negate"."""
    mask = draw.mask(fault)
    if not mask.any() or not candidates:
        return
    target = variant(seed, layout.table, fault, len(candidates), *keys)
    choice = variant(seed, layout.table, fault + ":value", len(bad_values or [""]), *keys)
    for position, column in enumerate(candidates):
        hit = mask & (target == position)
        original = fields[column]
        fields[column] = text.patch(original, hit, lambda rows: (
            text.concat("-", original.take(rows)) if bad_values is None else text.words(bad_values, choice[rows])))
        touched[hit] = column


def _wrong_column_count(layout: CsvLayout, line: pa.Array, fields: dict, draw: FaultDraw, seed: int,
                        keys: tuple) -> pa.Array:
    """Half of these lines get an extra field, the other half lose their last one."""
    mask = draw.mask("wrong_column_count")
    extra = variant(seed, layout.table, "wrong_column_count", 2, *keys) == 0
    line = text.patch(line, mask & extra, lambda rows: pc.replace_substring_regex(line.take(rows), "\n$", ",see note\n"))
    return text.patch(line, mask & ~extra, lambda rows: text.concat(
        text.join_fields(*(fields[c].take(rows) for c in layout.columns[:-1])), "\n"))
