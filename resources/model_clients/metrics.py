"""Counters of one step's model calls, turned into materialization metadata."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import dagster as dg
import numpy as np

# Metadata keys (stable: dashboards and tests read them).
METRIC_KEYS = (
    "provider", "model", "items", "items_embedded", "cache_hits", "deduplicated", "truncated",
    "requests", "failed_requests", "tokens", "tokens_estimated", "retries", "retries_by_cause",
    "dlq_count", "dlq_by_reason", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
    "estimated_cost_usd", "seconds", "items_per_second", "throttle_wait_seconds",
    "breaker_opens", "model_load_seconds",
)  # fmt: skip


class CallMetrics:
    """Thread-safe counters: worker threads record requests and retries, the step records items."""

    def __init__(self, provider: str, model: str, price_per_1k_tokens: float, max_latency_samples: int = 50_000) -> None:
        self.provider = provider
        self.model = model
        self.price_per_1k_tokens = price_per_1k_tokens
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.items = 0
        self.items_embedded = 0
        self.cache_hits = 0
        self.deduplicated = 0
        self.truncated = 0
        self.requests = 0
        self.failed_requests = 0
        self.tokens = 0
        self.tokens_estimated = False
        self.retries: Counter[str] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.throttle_wait_seconds = 0.0
        self.breaker_opens = 0
        self.model_load_seconds = 0.0
        self._latencies_ms: list[float] = []
        self._latency_count = 0
        self._max_samples = max_latency_samples
        self._random = random.Random(0)
        self._lock = threading.Lock()

    def record_request(self, latency_s: float, ok: bool, tokens: int | None = None, estimated_tokens: int = 0) -> None:
        with self._lock:
            self.requests += 1
            self.failed_requests += 0 if ok else 1
            if ok:
                self.tokens += tokens if tokens is not None else estimated_tokens
                self.tokens_estimated |= tokens is None
            self._sample_latency(latency_s * 1000.0)

    def record_retry(self, cause: str) -> None:
        with self._lock:
            self.retries[cause] += 1

    def record_dead_letters(self, reason_class: str, count: int = 1) -> None:
        with self._lock:
            self.dead_letters[reason_class] += count

    def finish(self) -> None:
        self.finished = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.started

    @property
    def dlq_count(self) -> int:
        return sum(self.dead_letters.values())

    @property
    def estimated_cost_usd(self) -> float:
        return self.tokens / 1000.0 * self.price_per_1k_tokens

    def latency_percentiles(self) -> dict[str, float]:
        with self._lock:
            samples = np.asarray(self._latencies_ms, dtype=float)
        if samples.size == 0:
            return {"latency_ms_p50": 0.0, "latency_ms_p95": 0.0, "latency_ms_p99": 0.0}
        p50, p95, p99 = np.percentile(samples, [50, 95, 99])
        return {f"latency_ms_p{q}": round(float(value), 1) for q, value in zip((50, 95, 99), (p50, p95, p99), strict=True)}

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and tests."""
        seconds = self.seconds
        return {
            "provider": self.provider,
            "model": self.model,
            "items": self.items,
            "items_embedded": self.items_embedded,
            "cache_hits": self.cache_hits,
            "deduplicated": self.deduplicated,
            "truncated": self.truncated,
            "requests": self.requests,
            "failed_requests": self.failed_requests,
            "tokens": self.tokens,
            "tokens_estimated": self.tokens_estimated,
            "retries": sum(self.retries.values()),
            "retries_by_cause": dict(sorted(self.retries.items())),
            "dlq_count": self.dlq_count,
            "dlq_by_reason": dict(sorted(self.dead_letters.items())),
            **self.latency_percentiles(),
            "estimated_cost_usd": round(self.estimated_cost_usd, 6),
            "seconds": round(seconds, 3),
            "items_per_second": round(self.items / seconds, 1) if seconds > 0 else 0.0,
            "throttle_wait_seconds": round(self.throttle_wait_seconds, 3),
            "breaker_opens": self.breaker_opens,
            "model_load_seconds": round(self.model_load_seconds, 3),
        }

    def to_metadata(self, prefix: str = "") -> dict[str, Any]:
        """Materialization metadata: numbers as numbers, breakdowns as JSON."""
        metadata: dict[str, Any] = {}
        for key, value in self.as_dict().items():
            metadata[f"{prefix}{key}"] = dg.MetadataValue.json(value) if isinstance(value, dict) else value
        return metadata

    def _sample_latency(self, latency_ms: float) -> None:
        # Reservoir sampling keeps percentiles honest with bounded memory on huge runs.
        self._latency_count += 1
        if len(self._latencies_ms) < self._max_samples:
            self._latencies_ms.append(latency_ms)
            return
        slot = self._random.randrange(self._latency_count)
        if slot < self._max_samples:
            self._latencies_ms[slot] = latency_ms
