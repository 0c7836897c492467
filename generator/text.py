"""Vectorized text building on Arrow string arrays: no Python string per record on the hot path."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Lines that must carry invalid UTF-8 hold this placeholder until the bytes are written.
BAD_BYTE_MARKER = "\x01"
BAD_BYTES = b"\xe9"  # a Latin-1 "e acute": the classic mis-encoded byte in a UTF-8 file

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_DASH_POSITIONS = (8, 12, 16, 20)


def words(vocabulary: list[str], index: np.ndarray) -> pa.Array:
    """The vocabulary entries at the given positions."""
    return pc.take(pa.array(vocabulary, pa.string()), pa.array(index))


def concat(*parts: pa.Array | str, skip_nulls: bool = False) -> pa.Array:
    """Element-wise concatenation; with skip_nulls a null part is left out instead of nulling the row."""
    return pc.binary_join_element_wise(*parts, "", null_handling="skip" if skip_nulls else "emit_null")


def join_fields(*fields: pa.Array | str, separator: str = ",") -> pa.Array:
    """Join per-row fields with a separator, leaving out null fields (how a missing JSON key is made)."""
    return pc.binary_join_element_wise(*fields, separator, null_handling="skip")


def patch(values: pa.Array, mask: np.ndarray, replace: Callable[[np.ndarray], pa.Array]) -> pa.Array:
    """Values with the masked rows replaced by `replace(rows)`, computed for those rows only.

    Faults are rare, so building replacements for the few rows they hit keeps memory flat.
    """
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        return values
    replacement = pc.cast(replace(rows), values.type)
    return pc.replace_with_mask(values, pa.array(mask), replacement)


def numbers(values: np.ndarray, decimals: int | None = None) -> pa.Array:
    """Numbers as the shortest text that reads back to the same value (12.5, not 12.500000001)."""
    if decimals is not None:
        values = np.round(values, decimals)
    return pc.cast(pa.array(values), pa.string())


def timestamps(epoch_seconds: np.ndarray, fmt: str) -> pa.Array:
    return pc.cast(pc.strftime(pa.array(epoch_seconds.astype("datetime64[s]")), format=fmt), pa.string())


def hex_ids(random_bits: np.ndarray) -> pa.Array:
    """UUID v4 text from 128 random bits per row (an (n, 2) uint64 array)."""
    raw = random_bits.astype("<u8").view(np.uint8).reshape(-1, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    digits = np.empty((len(raw), 32), dtype=np.uint8)
    digits[:, 0::2] = _HEX_DIGITS[raw >> 4]
    digits[:, 1::2] = _HEX_DIGITS[raw & 0x0F]
    pieces = np.split(digits, _DASH_POSITIONS, axis=1)
    dash = np.full((len(raw), 1), ord("-"), dtype=np.uint8)
    text = np.concatenate([pieces[0], dash, pieces[1], dash, pieces[2], dash, pieces[3], dash, pieces[4]], axis=1)
    return fixed_width(text)


def fixed_width(chars: np.ndarray) -> pa.Array:
    """An (n, width) uint8 array of ASCII as an Arrow string array, without a Python object per row."""
    count, width = chars.shape
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(chars)))


def write_lines(out: BinaryIO, lines: pa.Array, has_bad_bytes: bool = False) -> None:
    """Write strings that already end with a newline, straight from the Arrow buffers (no copy)."""
    if len(lines) == 0:
        return
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset: lines.offset + len(lines) + 1]
    data = memoryview(lines.buffers()[2])[offsets[0]: offsets[-1]]
    if has_bad_bytes:
        data = bytes(data).replace(BAD_BYTE_MARKER.encode(), BAD_BYTES)
    out.write(data)
