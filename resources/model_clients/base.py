"""The small interface every model client implements, and the checks no answer escapes.

An embedding client turns one request (a list of texts) into one matrix of vectors; a chat client
turns one conversation into one parsed JSON object. Neither retries, caches or throttles: that is
the session's job (see `embedder.py`, `chat.py`), so every provider gets the same behaviour.
"""

from __future__ import annotations

import abc
import email.utils
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from resources.model_clients.errors import InvalidOutputError


@dataclass(frozen=True)
class RateLimitInfo:
    """What the server said about its budget (`x-ratelimit-*` headers), when it said anything."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None) -> RateLimitInfo | None:
        if not headers:
            return None
        info = cls(
            limit_requests=_int_header(headers, "x-ratelimit-limit-requests"),
            remaining_requests=_int_header(headers, "x-ratelimit-remaining-requests"),
            reset_requests_s=parse_duration(headers.get("x-ratelimit-reset-requests")),
            limit_tokens=_int_header(headers, "x-ratelimit-limit-tokens"),
            remaining_tokens=_int_header(headers, "x-ratelimit-remaining-tokens"),
            reset_tokens_s=parse_duration(headers.get("x-ratelimit-reset-tokens")),
        )
        return None if info == cls() else info


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        return int(float(headers[name]))
    except (KeyError, TypeError, ValueError):
        return None


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Seconds in an OpenAI reset header: "20ms", "1.5s", "6m0s", "1h2m3s", or a bare number."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(number) * scale[unit] for number, unit in parts)


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from `retry-after-ms` (preferred, it is precise) or `Retry-After`
    (seconds or an HTTP date)."""
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if divisor == 1.0 else None
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if seconds == seconds and seconds >= 0:  # not NaN, not negative
            return seconds
    return None


@dataclass
class EmbeddingResponse:
    """One request's answer. Row i of `vectors` belongs to input i; `valid[i]` is False when that
    vector cannot be trusted (NaN/inf, wrong length) and must not be stored."""

    vectors: np.ndarray
    valid: np.ndarray
    tokens: int | None = None
    rate_limit: RateLimitInfo | None = None
    problem: str | None = None  # why some rows are invalid, for the dead-letter message


@dataclass
class ChatResponse:
    data: dict[str, Any]
    tokens: int | None = None
    rate_limit: RateLimitInfo | None = None


class EmbeddingClient(abc.ABC):
    """One request = a list of non-empty texts -> one vector each, in input order."""

    provider: str
    model: str
    dimensions: int
    # How many requests may usefully run at once (a local model on a CPU: one).
    max_parallel_requests: int | None = None
    load_seconds: float = 0.0

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        """Raises ModelCallError (or InvalidOutputError) when the request fails as a whole."""

    def close(self) -> None:
        """Release connections or memory."""


class ChatClient(abc.ABC):
    """One request = a conversation -> one JSON object parsed from the reply."""

    provider: str
    model: str
    max_parallel_requests: int | None = None

    @abc.abstractmethod
    def complete_json(self, messages: Sequence[Mapping[str, str]]) -> ChatResponse:
        """Raises ModelCallError, or InvalidOutputError when the reply is not a JSON object."""

    def close(self) -> None:
        """Release connections."""


def assemble_vectors(
    rows: Sequence[tuple[Any, np.ndarray | None]], count: int, dimensions: int
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Place (index, vector) rows of an answer into input order, trusting nothing.

    A wrong number of rows or indexes that are not exactly 0..count-1 make the whole answer
    unusable (InvalidOutputError). A single vector of the wrong length or with NaN/inf only
    marks that row invalid.
    """
    if len(rows) != count:
        raise InvalidOutputError(f"expected {count} vectors, got {len(rows)}")
    indexes = [row[0] for row in rows]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes) or sorted(indexes) != list(range(count)):
        raise InvalidOutputError("vector indexes are not a permutation of the inputs")
    matrix = np.zeros((count, dimensions), dtype=np.float32)
    valid = np.zeros(count, dtype=bool)
    problems: list[str] = []
    for index, vector in rows:
        if vector is None:
            problems.append("an undecodable vector")
        elif vector.shape != (dimensions,):
            problems.append(f"a vector of length {vector.size} (expected {dimensions})")
        elif not np.isfinite(vector).all():
            problems.append("a vector with NaN/inf")
        else:
            matrix[index] = vector
            valid[index] = True
    return matrix, valid, _describe(problems)


def check_matrix(matrix: np.ndarray, count: int, dimensions: int) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The same trust checks for a model that returns one matrix (a local model)."""
    if matrix.ndim != 2 or matrix.shape[0] != count:
        raise InvalidOutputError(f"expected {count} vectors, got shape {matrix.shape}")
    if matrix.shape[1] != dimensions:
        problem = f"vectors of length {matrix.shape[1]} (expected {dimensions})"
        return np.zeros((count, dimensions), dtype=np.float32), np.zeros(count, dtype=bool), problem
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    valid = np.isfinite(matrix).all(axis=1)
    return matrix, valid, None if valid.all() else "a vector with NaN/inf"


def _describe(problems: list[str]) -> str | None:
    if not problems:
        return None
    first = problems[0]
    return first if len(problems) == 1 else f"{first} (and {len(problems) - 1} more)"
