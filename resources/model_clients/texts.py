"""One rule for what a text is before it meets a model: normalized, truncated, hashed, batched.

The cache key is the sha256 of the text exactly as sent (normalized, then truncated), so two
items with the same text share one vector and one request, and changing the truncation limit
re-embeds only the texts it changes.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PreparedText:
    item_key: str
    text: str  # normalized and truncated: what is sent
    text_hash: str  # sha256 hex of `text`
    truncated: bool


def normalize_text(text: str) -> str:
    """NFC and single spaces: formatting differences must not buy a second vector."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_text(item_key: object, raw_text: object, max_chars: int) -> PreparedText:
    text = normalize_text("" if raw_text is None else str(raw_text))
    truncated = len(text) > max_chars
    if truncated:
        text = text[:max_chars].rstrip()
    return PreparedText(str(item_key), text, text_hash(text) if text else "", truncated)


def estimate_tokens(text: str, chars_per_token: float = 4.0) -> int:
    """Rough token count (English averages ~4 characters a token) when the server gives none."""
    return max(1, round(len(text) / chars_per_token))


def plan_batches(texts: Iterable[tuple[str, str]], max_items: int, max_chars: int) -> Iterator[list[tuple[str, str]]]:
    """Group (text_hash, text) pairs into requests of at most `max_items` inputs and `max_chars`
    characters (a single longer text still travels, alone)."""
    batch: list[tuple[str, str]] = []
    size = 0
    for pair in texts:
        if batch and (len(batch) >= max_items or size + len(pair[1]) > max_chars):
            yield batch
            batch, size = [], 0
        batch.append(pair)
        size += len(pair[1])
    if batch:
        yield batch


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
