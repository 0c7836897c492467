"""Which record gets which fault, and the log of every injected fault (what tests check against)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from generator.randomness import integers, uniform

MANIFEST_COLUMNS = ("source", "table", "line_no", "item_no", "record_key", "fault", "field")


@dataclass(frozen=True)
class FaultDraw:
    """A fault per record: code 0 is clean, code i is names[i - 1]."""

    names: tuple[str, ...]
    codes: np.ndarray

    def mask(self, name: str) -> np.ndarray:
        if name not in self.names:
            return np.zeros(len(self.codes), dtype=bool)
        return self.codes == self.names.index(name) + 1

    @property
    def faulty(self) -> np.ndarray:
        return self.codes > 0

    def labels(self) -> np.ndarray:
        return np.array(("",) + self.names, dtype=object)[self.codes]


def draw_faults(seed: int, table: str, rates: dict[str, float], *keys: np.ndarray | int) -> FaultDraw:
    """At most one fault per record: one uniform draw falls into one rate's interval, or none."""
    names = tuple(rates)
    u = uniform(seed, f"fault:{table}", *keys)
    position = np.searchsorted(np.cumsum(list(rates.values())), u, side="right")
    codes = np.where(position < len(names), position + 1, 0).astype(np.int8)
    return FaultDraw(names, codes)


def variant(seed: int, table: str, fault: str, choices: int, *keys: np.ndarray | int) -> np.ndarray:
    """Which flavour of a fault a record shows (e.g. which field goes missing)."""
    return integers(seed, f"variant:{table}:{fault}", choices, *keys)


@dataclass
class FaultLog:
    """Rows of the fault manifest for one day, written as `_manifest/faults/<day>.csv`."""

    parts: list[pa.Table] = field(default_factory=list)

    def add(self, source: str, table: str, line_no: np.ndarray, record_key: pa.Array, fault: np.ndarray | str,
            field_name: np.ndarray | str, item_no: np.ndarray | None = None) -> None:
        count = len(line_no)
        if count == 0:
            return
        item = pa.array(item_no, pa.int64()) if item_no is not None else pa.nulls(count, pa.int64())
        self.parts.append(pa.table({
            "source": pa.array([source] * count),
            "table": pa.array([table] * count),
            "line_no": pa.array(line_no, pa.int64()),
            "item_no": item,
            "record_key": pa.array(record_key, pa.string()).cast(pa.string()),
            "fault": pa.array(np.broadcast_to(np.asarray(fault, dtype=object), (count,)).astype(str)),
            "field": pa.array(np.broadcast_to(np.asarray(field_name, dtype=object), (count,)).astype(str)),
        }))

    def counts(self) -> dict[str, dict[str, int]]:
        """Faults per table and type."""
        result: dict[str, dict[str, int]] = {}
        for part in self.parts:
            for table, fault in zip(part["table"].to_pylist(), part["fault"].to_pylist()):
                result.setdefault(table, {}).setdefault(fault, 0)
                result[table][fault] += 1
        return result

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = pa.schema([("source", pa.string()), ("table", pa.string()), ("line_no", pa.int64()),
                            ("item_no", pa.int64()), ("record_key", pa.string()), ("fault", pa.string()),
                            ("field", pa.string())])
        table = pa.concat_tables([p.cast(schema) for p in self.parts]) if self.parts else schema.empty_table()
        pacsv.write_csv(table.sort_by([("source", "ascending"), ("line_no", "ascending"), ("item_no", "ascending")]),
                        str(path))
