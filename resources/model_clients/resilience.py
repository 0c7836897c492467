"""Retries, throttling and the circuit breaker: the single source of resilience for every client.

The openai SDK's own retries are switched off (`max_retries=0`): if both layers retried, 5
attempts of ours would become 15 requests, the SDK would sleep without our throttle knowing, and
its retries would be invisible to the metrics. Here, per attempt:

1. the breaker is asked first (open: fail fast with `circuit_open`; cooled down: one probe);
2. the throttle grants a slot (in-flight below the adaptive limit, no server-requested pause,
   spacing when the server's request budget runs low);
3. the outcome feeds both: a 429 halves the limit and pauses everyone for `Retry-After`,
   successes grow the limit back by one per window (AIMD); 5xx, 408/409, timeouts, connection
   errors and 401/403/404 count towards opening the breaker, any other answer (429, 400,
   unusable output included: the server is up) closes it.

Between attempts the caller sleeps `RetryPolicy.wait` outside the throttle slot.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from resources.model_clients.base import RateLimitInfo
from resources.model_clients.errors import INVALID_OUTPUT, CircuitOpenError, ModelCallError
from resources.model_clients.metrics import CallMetrics

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 20.0
    max_retry_after_s: float = 60.0

    def wait(self, attempt: int, error: ModelCallError, rng: random.Random) -> float | None:
        """Seconds to sleep before attempt `attempt + 1`, or None to give up now.

        Full jitter (uniform in [0, min(cap, base * 2^(attempt-1))]) spreads clients apart; a
        server's Retry-After is a floor, with up to 10 % on top so a crowd released at the
        same instant does not arrive at the same instant.
        """
        if not error.retryable or attempt >= self.max_attempts:
            return None
        if error.retry_after is not None:
            if error.retry_after > self.max_retry_after_s:
                return None
            return error.retry_after * (1.0 + 0.1 * rng.random())
        return rng.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1)))


class AdaptiveThrottle:
    """Gates requests: at most `limit` in flight, none during a pause, paced when budget is low.

    Pacing is a small client-side token bucket refilled at the server's refill rate, learned from
    `x-ratelimit-limit/remaining/reset-*`. It holds a couple of tokens so a thread that wakes a
    little late (a busy CPU) does not lose its turn, which would pace below the server's rate.
    """

    PACER_BURST = 2.0

    def __init__(self, max_concurrency: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.limit = float(self.max_concurrency)
        self.in_flight = 0
        self.wait_seconds = 0.0
        self._clock = clock
        self._paused_until = 0.0
        self._pace_rate: float | None = None  # requests/s while the server's budget is low
        self._allowance = self.PACER_BURST
        self._allowance_at = clock()
        self._seen_budget_headers = False
        self._last_decrease = -1e9
        self._tokens_per_request = 0.0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()

    def on_success(self, rate_limit: RateLimitInfo | None, tokens: int | None = None) -> None:
        with self._cond:
            self.limit = min(float(self.max_concurrency), self.limit + 1.0 / self.limit)
            if tokens:  # a moving average, for pacing by the token budget
                previous = self._tokens_per_request or tokens
                self._tokens_per_request = 0.9 * previous + 0.1 * tokens
            self._learn(rate_limit)
            self._cond.notify_all()

    def on_rate_limited(self, retry_after: float | None, rate_limit: RateLimitInfo | None) -> None:
        with self._cond:
            now = self._clock()
            self._learn(rate_limit)
            # One decrease per burst of 429s (the requests in flight all hit the same wall). When
            # the server publishes its budget the pacer does the real work: decrease gently.
            if now - self._last_decrease > max(0.05, retry_after or 0.0):
                factor = 0.8 if self._seen_budget_headers else 0.5
                self.limit = max(1.0, self.limit * factor)
                self._last_decrease = now
            if retry_after:
                self._paused_until = max(self._paused_until, now + retry_after)
            self._cond.notify_all()

    def _acquire(self) -> None:
        with self._cond:
            waited_from = None
            while True:
                now = self._clock()
                wait = self._wait_needed(now)
                if wait <= 0:
                    break
                waited_from = waited_from if waited_from is not None else now
                self._cond.wait(timeout=min(1.0, wait))
            if waited_from is not None:
                self.wait_seconds += now - waited_from
            self.in_flight += 1
            if self._pace_rate:
                self._allowance -= 1.0

    def _wait_needed(self, now: float) -> float:
        """Seconds until a request may start (0: now); 1 s when only a release can help."""
        if now < self._paused_until:
            return self._paused_until - now
        if self.in_flight >= int(self.limit):
            return 1.0
        if not self._pace_rate:
            return 0.0
        self._allowance = min(self.PACER_BURST, self._allowance + (now - self._allowance_at) * self._pace_rate)
        self._allowance_at = now
        return 0.0 if self._allowance >= 1.0 else (1.0 - self._allowance) / self._pace_rate

    def _learn(self, info: RateLimitInfo | None) -> None:
        """Pace at the server's refill rate once its remaining budget is within reach of what
        we have in flight; stop pacing when the budget is comfortable again."""
        if info is None:
            return
        self._seen_budget_headers = True
        rates = [
            _pacing_rate(info.limit_requests, info.remaining_requests, info.reset_requests_s, 1.0, self.in_flight),
            _pacing_rate(
                info.limit_tokens, info.remaining_tokens, info.reset_tokens_s, self._tokens_per_request, self.in_flight
            ),
        ]
        paced = [rate for rate in rates if rate is not None]
        if not paced:
            self._pace_rate = None
            self._allowance = self.PACER_BURST
        else:
            if self._pace_rate is None:
                self._allowance_at = self._clock()
            self._pace_rate = min(paced)


def _pacing_rate(
    limit: int | None, remaining: int | None, reset_s: float | None, cost: float, in_flight: int
) -> float | None:
    """Requests/s the budget sustains, or None when there is no need to pace."""
    if limit is None or remaining is None or not reset_s or cost <= 0:
        return None
    if remaining > cost * max(in_flight, 1) * 2:
        return None
    refill_per_s = max(limit - remaining, 1) / reset_s  # a token bucket refills to full in reset_s
    return refill_per_s / cost


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures -> after `cooldown_s`, one
    probe (half-open) -> closed on its success, open again on its failure."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown_s = cooldown_s
        self.state = self.CLOSED
        self.consecutive_failures = 0
        self.opens = 0
        self.last_error = ""
        self.clock = clock
        self._opened_at = 0.0
        self._probe: int | None = None  # thread id of the probing caller
        self._cond = threading.Condition()

    def before_call(self) -> None:
        """Return to make the call; raise CircuitOpenError to skip it."""
        with self._cond:
            while True:
                if self.state == self.CLOSED:
                    return
                if self.state == self.OPEN:
                    if self.clock() - self._opened_at < self.cooldown_s:
                        raise CircuitOpenError(self._open_message())
                    self.state = self.HALF_OPEN
                    self._probe = threading.get_ident()
                    return
                # Half-open: one probe is out; the others wait for its verdict.
                self._cond.wait(timeout=0.5)

    def record_success(self) -> None:
        with self._cond:
            self.state = self.CLOSED
            self.consecutive_failures = 0
            self._probe = None
            self._cond.notify_all()

    def record_failure(self, error: ModelCallError) -> None:
        with self._cond:
            self.consecutive_failures += 1
            self.last_error = error.message
            probing = self.state == self.HALF_OPEN and self._probe == threading.get_ident()
            if probing or (self.state == self.CLOSED and self.consecutive_failures >= self.failure_threshold):
                self.state = self.OPEN
                self._opened_at = self.clock()
                self._probe = None
                self.opens += 1
                self._cond.notify_all()

    def release_probe(self) -> None:
        """A probe that ended without a verdict (an input error, a crash) lets the next caller probe."""
        with self._cond:
            if self.state == self.HALF_OPEN and self._probe == threading.get_ident():
                self.state = self.OPEN
                self._opened_at = self.clock() - self.cooldown_s
                self._probe = None
                self._cond.notify_all()

    def _open_message(self) -> str:
        return f"circuit open after {self.consecutive_failures} consecutive failures; last error: {self.last_error}"


class ResilientCaller:
    """Runs single attempts through breaker, throttle and metrics, and decides the waits."""

    def __init__(
        self,
        policy: RetryPolicy,
        throttle: AdaptiveThrottle,
        breaker: CircuitBreaker,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self.throttle = throttle
        self.breaker = breaker
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sleep = sleep

    def attempt(self, call: Callable[[], T], metrics: CallMetrics, estimated_tokens: int = 0) -> T:
        """One attempt. Raises ModelCallError (incl. CircuitOpenError) on failure."""
        self.breaker.before_call()
        verdict = False
        try:
            with self.throttle.slot():
                started = time.perf_counter()
                try:
                    result = call()
                except ModelCallError as error:
                    metrics.record_request(time.perf_counter() - started, ok=False)
                    verdict = self._feed_back_failure(error)
                    raise
            metrics.record_request(time.perf_counter() - started, True, getattr(result, "tokens", None), estimated_tokens)
            self.breaker.record_success()
            verdict = True
            self.throttle.on_success(getattr(result, "rate_limit", None), getattr(result, "tokens", None))
            return result
        finally:
            if not verdict:
                self.breaker.release_probe()

    def pause_before_retry(self, attempt: int, error: ModelCallError, metrics: CallMetrics) -> bool:
        """Sleep before the next attempt; False when the policy says give up."""
        with self._rng_lock:
            wait = self.policy.wait(attempt, error, self._rng)
        if wait is None:
            return False
        metrics.record_retry(error.cause)
        self._sleep(wait)
        return True

    def _feed_back_failure(self, error: ModelCallError) -> bool:
        """Tell breaker and throttle; True when the breaker got a verdict."""
        if error.status == 429:
            self.throttle.on_rate_limited(error.retry_after, error.rate_limit)  # type: ignore[arg-type]
        if error.counts_against_breaker:
            self.breaker.record_failure(error)
            return True
        if error.status is not None or error.reason_class == INVALID_OUTPUT:  # the server answered: it is up
            self.breaker.record_success()
            return True
        return False
