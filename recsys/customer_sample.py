"""A deterministic sample of customers to fit the segments on.

`CustomerSample` keeps the customers with the smallest seeded 64-bit hash of their id (a bottom-k
sketch): deterministic, independent of chunking and order, and mostly the same customers from one
run to the next, which is half of what keeps segments stable.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def id_priorities(customer_ids: pa.Array, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id (FNV-1a over UTF-8, then a splitmix64 finalizer).

    Vectorized over the Arrow string buffers; the same id and seed give the same value on any
    machine and in any chunk.
    """
    ids = _single_array(customer_ids).cast(pa.large_string())
    if ids.null_count:
        raise ValueError("customer ids must not be null")
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset : ids.offset + len(ids) + 1]
    data_buffer = ids.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(1, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    hashes = np.full(len(ids), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for position in range(int(lengths.max()) if len(lengths) else 0):
            active = lengths > position
            byte = data[starts[active] + position].astype(np.uint64)
            hashes[active] = (hashes[active] ^ byte) * _FNV_PRIME
        return _splitmix64(hashes ^ _splitmix64(np.full(1, seed, dtype=np.uint64)))


def _single_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class CustomerSample:
    """The `size` customers with the smallest id priority seen so far, with their vectors.

    Keep `seed` fixed from run to run: the sample is then mostly the same customers, which is
    half of what keeps segments stable.
    """

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError("sample size must be >= 1")
        self.size, self.seed = size, seed
        self._priorities = np.zeros(0, dtype=np.uint64)
        self._ids = pa.array([], type=pa.string())
        self._vectors: np.ndarray | None = None

    def add(self, customer_ids: pa.Array, vectors: np.ndarray) -> None:
        """Offer a chunk of customers (ids and their vectors, row for row)."""
        customer_ids = _single_array(customer_ids).cast(pa.string())
        if len(customer_ids) != len(vectors):
            raise ValueError("customer_ids and vectors must have one row per customer")
        priorities = id_priorities(customer_ids, self.seed)
        if len(self._priorities) == self.size:
            # Only ids below the current largest priority can enter a full sample.
            candidates = np.flatnonzero(priorities < self._priorities[-1])
            priorities, vectors = priorities[candidates], vectors[candidates]
            customer_ids = customer_ids.take(pa.array(candidates))
        if not len(priorities):
            return
        merged = np.concatenate([self._priorities, priorities])
        order = np.argsort(merged, kind="stable")[: self.size]
        self._vectors = self._gather(order, np.asarray(vectors, dtype=np.float32))
        self._priorities = merged[order]
        self._ids = pa.concat_arrays([self._ids, customer_ids]).take(pa.array(order))

    def _gather(self, order: np.ndarray, new_vectors: np.ndarray) -> np.ndarray:
        """Rows `order` of (kept rows, then new rows), without concatenating both first."""
        kept = len(self._priorities)
        gathered = np.empty((len(order), new_vectors.shape[1]), dtype=np.float32)
        from_kept = order < kept
        if kept:
            gathered[from_kept] = self._vectors[order[from_kept]]
        gathered[~from_kept] = new_vectors[order[~from_kept] - kept]
        return gathered

    @property
    def customer_ids(self) -> pa.StringArray:
        return self._ids

    @property
    def vectors(self) -> np.ndarray:
        """(n x d) float32 in priority order: any prefix is itself a uniform sample."""
        return self._vectors if self._vectors is not None else np.zeros((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._priorities)
