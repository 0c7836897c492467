"""Counter-based randomness: every random draw is a pure function of (seed, stream, keys).

A customer's taste, a purchase's product or a record's fault depend only on its own ids, never on
how many draws came before. So any chunk size gives the same records (only the place of resent
duplicates follows the chunks), returning customers keep their taste across days, and nothing
about 2M customers has to stay in memory.
"""

from __future__ import annotations

import zlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer: a fast bijective scrambler of 64-bit counters (wraps on overflow)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def stream_id(name: str) -> int:
    """A stable number for a named stream, so adding a stream never shifts the others."""
    return zlib.crc32(name.encode())


def hash64(seed: int, stream: str, *keys: np.ndarray | int) -> np.ndarray:
    """64 random bits for each element of the (broadcast) keys."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(seed, dtype=np.uint64) ^ np.uint64(stream_id(stream)))
        for key in keys:
            h = _splitmix64(h ^ np.asarray(key).astype(np.uint64))
    return np.asarray(h, dtype=np.uint64)


def uniform(seed: int, stream: str, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1) from the top 53 bits of the hash."""
    return (hash64(seed, stream, *keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def integers(seed: int, stream: str, high: int | np.ndarray, *keys: np.ndarray | int) -> np.ndarray:
    """Integers in [0, high) (high may vary per element)."""
    return np.floor(uniform(seed, stream, *keys) * high).astype(np.int64)


def zipf_cdf(size: int, exponent: float) -> np.ndarray:
    """Cumulative probabilities of ranks 0..size-1 under a Zipf law (rank 0 most popular)."""
    weights = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]
