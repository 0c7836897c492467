"""Retries, throttling and the circuit breaker: the single source of resilience for every client.

The openai SDK's own retries are switched off (`max_retries=0`): if both layers retried, 5
attempts of ours would become 15 requests, the SDK would sleep without our throttle knowing, and
its retries would be invisible to the metrics. Here, per attempt:

1. the breaker is asked first (open: fail fast with `circuit_open`; cooled down: one probe);
2. the throttle grants a slot (in-flight below the adaptive limit, and a token of its bucket,
   which mirrors the server's rate limit);
3. the outcome feeds both: a 429 empties the bucket (and, without budget headers, lowers the
   rate and the concurrency, AIMD), successes grow them back; 5xx, 408/409, timeouts,
   connection errors and 401/403/404 count towards opening the breaker, any other answer (429,
   400, unusable output included: the server is up) closes it.

Between attempts the caller sleeps `RetryPolicy.wait` outside the throttle slot.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from resources.model_clients.base import RateLimitInfo
from resources.model_clients.errors import INVALID_OUTPUT, CircuitOpenError, ModelCallError, ModelConfigurationError
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
    """Gates requests: at most `limit` in flight, and paced like the server's token bucket (GCRA:
    each request gets its own send time, one period after the previous one, or sooner while the
    bucket has burst left), so requests never arrive faster than the server's bucket refills.

    - With budget headers (`x-ratelimit-limit/remaining/reset-*`, OpenAI's and most gateways'):
      the pace is the server's capacity (`limit`) and refill rate ((limit - remaining) / reset),
      at `pace_margin` of it so that arrival jitter does not overrun a strict limit. A 429
      restarts the schedule one period later and lowers the margin by 3 %; answers raise it
      slowly again (AIMD on the pace), so it settles where about 0.5 % of requests meet a 429.
    - Without them, the rate is learned from 429s (AIMD): a 429 sets it to `decrease` x the rate
      just achieved and halves the concurrency limit; successes add back (`increase` of the
      rate per second of successes, one request of concurrency per window).

    Each request sleeps until its own send time (no herd of threads woken for one token), then
    until it conforms to the bucket by the times earlier requests actually went (`_conform`). A
    429's `Retry-After` pauses the request it answered (the caller's retry policy waits it out,
    or gives up beyond `max_retry_after_seconds`); it does not stop the other requests, which
    the schedule already holds to the server's pace.
    """

    MIN_RATE = 0.1  # requests/s: the slowest pace AIMD goes down to

    MAX_MARGIN, MIN_MARGIN = 0.98, 0.7

    def __init__(self, max_concurrency: int, pace_margin: float = 0.95, decrease: float = 0.7,
                 increase: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.limit = float(self.max_concurrency)
        self.in_flight = 0
        self.wait_seconds = 0.0
        self.pace_margin, self.decrease, self.increase = pace_margin, decrease, increase
        self.rate: float | None = None  # requests/s the server's bucket refills at; None: not paced
        self.burst = float(self.max_concurrency)
        self.learned_from_headers = False
        self._clock, self._sleep = clock, sleep
        self._next_send = clock()  # the theoretical send time of the next request (GCRA)
        self._sent_tat = clock()  # the same, kept from the times requests actually went
        self._last_decrease = -1e9
        self._tokens_per_request = 0.0
        self._granted: deque[float] = deque(maxlen=64)  # recent send times, to measure the achieved rate
        self._refill_estimates: deque[float] = deque(maxlen=32)  # recent refill rates from headers
        self._answered = False  # any answer yet (success or 429)
        self._cond = threading.Condition()

    @property
    def period(self) -> float:
        return 1.0 / (self.rate * self.pace_margin) if self.rate else 0.0

    @contextmanager
    def slot(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= 1
                self._cond.notify()

    def on_success(self, rate_limit: RateLimitInfo | None, tokens: int | None = None) -> None:
        with self._cond:
            self._answered = True
            self.limit = min(float(self.max_concurrency), self.limit + 1.0 / self.limit)
            if tokens:  # a moving average, for pacing by the token budget
                previous = self._tokens_per_request or tokens
                self._tokens_per_request = 0.9 * previous + 0.1 * tokens
            if self._learn(rate_limit):
                # Creep back towards the server's full rate: about +1.5 % per 100 answers.
                self.pace_margin = min(self.MAX_MARGIN, self.pace_margin + 0.00015)
            elif self.rate is not None and not self.learned_from_headers:
                self.rate += self.increase * self.rate / max(self.rate, 1.0)  # AIMD: + increase x rate per second
            self._cond.notify()

    def on_answer(self) -> None:
        """Any other answer of the server (an error status): the first-request gate opens."""
        with self._cond:
            self._answered = True
            self._cond.notify()

    def on_rate_limited(self, retry_after: float | None, rate_limit: RateLimitInfo | None) -> None:
        with self._cond:
            self._answered = True
            now = self._clock()
            known = self.learned_from_headers
            if self._learn(rate_limit):
                if known and now - self._last_decrease > self.period:
                    # Paced at a known rate and still refused: arrivals jitter more than the margin
                    # allows (once per period: the requests already scheduled meet the same wall).
                    self.pace_margin = max(self.MIN_MARGIN, self.pace_margin * 0.97)
                    self._last_decrease = now
            elif now - self._last_decrease > 0.05:
                # One decrease per burst of 429s (the requests in flight all hit the same wall).
                achieved = self._achieved_rate(now)
                if achieved is not None:  # nothing measured yet: only the concurrency comes down
                    self.rate = max(self.MIN_RATE, self.decrease * min(achieved, self.rate or achieved))
                    self.burst = 1.0
                self.limit = max(1.0, self.limit * 0.5)
                self._last_decrease = now
            self._next_send = max(self._next_send, now + self.burst * self.period)  # the server's bucket is empty
            self._cond.notify()

    def _acquire(self) -> None:
        with self._cond:
            started = self._clock()
            # Until the first answer, one request at a time: its budget headers (if any) say how
            # fast to go, and a burst into an unknown limit would only buy 429s.
            while self.in_flight >= (int(self.limit) if self._answered else 1):
                self._cond.wait(timeout=1.0)
            self.in_flight += 1
            now = self._clock()
            send_at = now
            if self.rate is not None:
                theoretical = max(self._next_send, now)
                send_at = max(now, theoretical - (self.burst - 1.0) * self.period)
                self._next_send = theoretical + self.period
            self._granted.append(send_at)
            self.wait_seconds += send_at - started
        if send_at > now:
            self._sleep(send_at - now)
        self._conform()

    def _conform(self) -> None:
        """Hold the send until it conforms to the server's bucket as the server will see it: by
        the times requests actually go, not the times they were given. On a loaded CPU a thread
        wakes late, and the next one, woken on time, would follow it closer than one period: a
        bucket of one request refuses that (measured: 9-14 % refused with three busy processes
        on the 2 cores, most of it this)."""
        while self.rate is not None:
            with self._cond:
                now = self._clock()
                earliest = self._sent_tat - (self.burst - 1.0) * self.period
                if now >= earliest:
                    self._sent_tat = max(self._sent_tat, now) + self.period
                    return
                self.wait_seconds += earliest - now
            self._sleep(earliest - now)

    def _achieved_rate(self, now: float) -> float | None:
        """Requests/s sent over the last 2 s, or None with too few to tell."""
        recent = [t for t in self._granted if t > now - 2.0]
        if len(recent) < 4:
            return self.rate
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)

    def _learn(self, info: RateLimitInfo | None) -> bool:
        """Pace like the server's bucket, from its budget headers; False when there are none."""
        if info is None:
            return False
        budgets = [_bucket_of(info.limit_requests, info.remaining_requests, info.reset_requests_s, 1.0)]
        if self._tokens_per_request:
            budgets.append(_bucket_of(info.limit_tokens, info.remaining_tokens, info.reset_tokens_s,
                                      self._tokens_per_request))
        known = [b for b in budgets if b is not None]
        if not known:
            return False
        capacity, refill, remaining = min(known, key=lambda b: b[1])
        # `remaining` is a whole number, so each estimate is at least the true refill rate (by up
        # to one token over `reset`): the smallest of the recent ones is the closest.
        self._refill_estimates.append(refill)
        first = not self.learned_from_headers
        self.rate, self.burst, self.learned_from_headers = min(self._refill_estimates), max(1.0, capacity), True
        if first:  # start from what the server says is left; later `remaining`s are stale on arrival
            self._next_send = self._clock() + (self.burst - min(remaining, self.burst)) * self.period
        return True


def _bucket_of(limit: int | None, remaining: int | None, reset_s: float | None,
               cost: float) -> tuple[float, float, float] | None:
    """(capacity, refill per second, remaining), in requests, of a budget the server published."""
    if limit is None or remaining is None or not reset_s or cost <= 0 or limit <= 0:
        return None
    refill = max(limit - remaining, 1) / reset_s  # a token bucket refills to full in reset_s
    return limit / cost, refill / cost, remaining / cost


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures -> after the cool-down, one
    probe (half-open) -> closed on its success, open again on its failure (the cool-down doubles,
    up to `max_cooldown_s`).

    While it is open, callers wait for the probe instead of failing: an outage costs time, not
    items. Only once the outage has lasted `max_outage_s` do callers fail fast with
    `CircuitOpenError` (their items go to the DLQ), until a probe succeeds again.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(self, failure_threshold: int, cooldown_s: float, max_outage_s: float = 600.0,
                 max_cooldown_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.base_cooldown_s = cooldown_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(max_cooldown_s, cooldown_s)
        self.max_outage_s = max_outage_s
        self.state = self.CLOSED
        self.consecutive_failures = 0
        self.opens = 0
        self.waited_s = 0.0  # time callers spent waiting for the breaker, summed over threads
        self.last_error = ""
        self.clock = clock
        self.log = log or (lambda message: None)
        self._opened_at = 0.0
        self._outage_started: float | None = None
        self._probe: int | None = None  # thread id of the probing caller
        self._cond = threading.Condition()

    def before_call(self) -> bool:
        """Return (True for the probe) to make the call; wait while the breaker is open; raise
        CircuitOpenError once the outage has lasted longer than `max_outage_s`."""
        with self._cond:
            waited_from = None
            try:
                while True:
                    now = self.clock()
                    if self.state == self.CLOSED:
                        return False
                    if self.state == self.OPEN:
                        if now - self._opened_at >= self.cooldown_s:
                            self.state = self.HALF_OPEN
                            self._probe = threading.get_ident()
                            return True
                        if now - self._outage_started >= self.max_outage_s:
                            raise CircuitOpenError(self._open_message(now))
                        timeout = self.cooldown_s - (now - self._opened_at)
                    else:
                        timeout = 0.5  # half-open: one probe is out; the others wait for its verdict
                    waited_from = now if waited_from is None else waited_from
                    self._cond.wait(timeout=min(timeout, 1.0))
            finally:
                if waited_from is not None:
                    self.waited_s += self.clock() - waited_from

    def record_success(self) -> None:
        with self._cond:
            if self._outage_started is not None:
                self.log(f"circuit closed: the endpoint answers again after an outage of "
                         f"{self.clock() - self._outage_started:.1f}s")
            self.state = self.CLOSED
            self.consecutive_failures = 0
            self.cooldown_s = self.base_cooldown_s
            self._outage_started = None
            self._probe = None
            self._cond.notify_all()

    def record_failure(self, error: ModelCallError) -> None:
        with self._cond:
            self.consecutive_failures += 1
            self.last_error = error.message
            probing = self.state == self.HALF_OPEN and self._probe == threading.get_ident()
            if probing or (self.state == self.CLOSED and self.consecutive_failures >= self.failure_threshold):
                now = self.clock()
                if probing:
                    self.cooldown_s = min(self.cooldown_s * 2, self.max_cooldown_s)
                self._outage_started = now if self._outage_started is None else self._outage_started
                self.state = self.OPEN
                self._opened_at = now
                self._probe = None
                self.opens += 1
                self.log(f"circuit open after {self.consecutive_failures} consecutive failures ({error.message}): "
                         f"requests wait {self.cooldown_s:.0f}s, then one probes; outage so far "
                         f"{now - self._outage_started:.1f}s, items are dead-lettered after {self.max_outage_s:.0f}s")
                self._cond.notify_all()

    def release_probe(self) -> None:
        """A probe that ended without a verdict (an input error, a crash) lets the next caller probe."""
        with self._cond:
            if self.state == self.HALF_OPEN and self._probe == threading.get_ident():
                self.state = self.OPEN
                self._opened_at = self.clock() - self.cooldown_s
                self._probe = None
                self._cond.notify_all()

    def _open_message(self, now: float) -> str:
        return (f"circuit open: the endpoint has failed for {now - self._outage_started:.0f}s "
                f"(max_outage_seconds {self.max_outage_s:.0f}); last error: {self.last_error}")


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
        """One attempt. Raises ModelCallError (incl. CircuitOpenError) on failure; a failed probe
        of an open breaker is marked `during_outage` (it is not the request's fault)."""
        probe = self.breaker.before_call()
        verdict = False
        try:
            with self.throttle.slot():
                started = time.perf_counter()
                try:
                    result = call()
                except ModelCallError as error:
                    metrics.record_request(time.perf_counter() - started, ok=False)
                    verdict = self._feed_back_failure(error)
                    error.during_outage = probe and error.counts_against_breaker
                    raise
            metrics.record_request(time.perf_counter() - started, True, getattr(result, "tokens", None), estimated_tokens)
            self.breaker.record_success()
            verdict = True
            self.throttle.on_success(getattr(result, "rate_limit", None), getattr(result, "tokens", None))
            return result
        finally:
            if not verdict:
                self.breaker.release_probe()

    def free_retry(self, error: ModelCallError, metrics: CallMetrics, provider: str, model: str) -> bool:
        """What every caller does first with a failed call: a configuration error fails the step
        (raised: no item is at fault); a failed outage probe is retried without spending an
        attempt (True: the breaker paces it). False: the caller's own policy decides."""
        if error.blames_configuration:
            raise ModelConfigurationError(error, provider, model) from None
        if error.during_outage:
            metrics.record_retry(error.cause)
            return True
        return False

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
        elif error.status is not None:
            self.throttle.on_answer()
        if error.counts_against_breaker:
            self.breaker.record_failure(error)
            return True
        if error.status is not None or error.reason_class == INVALID_OUTPUT:  # the server answered: it is up
            self.breaker.record_success()
            return True
        return False
