"""Model clients, the pure parts: parsing, batching, checks, backoff, throttle, breaker."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from resources.model_clients.base import RateLimitInfo, assemble_vectors, parse_duration, parse_retry_after
from resources.model_clients.errors import (
    CLIENT_ERROR,
    RATE_LIMITED,
    SERVER_ERROR,
    TIMEOUT,
    CircuitOpenError,
    InvalidOutputError,
    ModelCallError,
    classify_status,
)
from resources.redaction import redact_text
from resources.model_clients.resilience import AdaptiveThrottle, CircuitBreaker, RetryPolicy
from resources.model_clients.texts import plan_batches, prepare_text


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "value, seconds",
    [("20ms", 0.02), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3s", 3723.0), ("0.25", 0.25), ("soon", None)],
)
def test_reset_header_durations(value, seconds):
    parsed = parse_duration(value)
    if seconds is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(seconds)


def test_retry_after_prefers_milliseconds_then_seconds_then_dates():
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "3"}) == pytest.approx(0.25)
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({"retry-after": "whenever"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    "status, reason, retryable",
    [(408, TIMEOUT, True), (409, SERVER_ERROR, True), (429, RATE_LIMITED, True), (500, SERVER_ERROR, True),
     (503, SERVER_ERROR, True), (400, CLIENT_ERROR, False), (401, CLIENT_ERROR, False), (403, CLIENT_ERROR, False),
     (404, CLIENT_ERROR, False), (422, CLIENT_ERROR, False)],
)  # fmt: skip
def test_which_statuses_are_retried(status, reason, retryable):
    assert classify_status(status) == (reason, retryable)


def test_redact_removes_known_secrets_and_key_shaped_strings():
    message = "Incorrect API key provided: Bearer sk-live-abcdef123456 (api_key=hunter2-long) my-own-secret"
    cleaned = redact_text(message, ["my-own-secret"])
    assert "sk-live-abcdef123456" not in cleaned and "hunter2-long" not in cleaned and "my-own-secret" not in cleaned
    assert "Incorrect API key provided" in cleaned


def test_full_jitter_backoff_stays_under_the_exponential_envelope_and_cap():
    policy = RetryPolicy(max_attempts=10, backoff_base_s=0.5, backoff_cap_s=4.0)
    rng = random.Random(1)
    error = ModelCallError(SERVER_ERROR, "boom", retryable=True)
    for attempt in range(1, 10):
        waits = [policy.wait(attempt, error, rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= min(4.0, 0.5 * 2 ** (attempt - 1))
    assert policy.wait(10, error, rng) is None  # attempts exhausted
    assert policy.wait(1, ModelCallError(CLIENT_ERROR, "bad", status=400), rng) is None  # never retried


def test_retry_after_is_a_floor_and_too_long_gives_up():
    policy = RetryPolicy(max_attempts=5, backoff_base_s=10.0, max_retry_after_s=30.0)
    rng = random.Random(2)
    limited = ModelCallError(RATE_LIMITED, "slow down", status=429, retryable=True, retry_after=1.5)
    assert all(1.5 <= policy.wait(1, limited, rng) <= 1.65 for _ in range(100))
    too_long = ModelCallError(RATE_LIMITED, "come back tomorrow", status=429, retryable=True, retry_after=3600)
    assert policy.wait(1, too_long, rng) is None


def test_batches_respect_count_and_character_limits():
    texts = [(str(i), "x" * (i % 50 + 1)) for i in range(1000)]
    batches = list(plan_batches(texts, max_items=64, max_chars=500))
    assert sum(len(b) for b in batches) == 1000
    assert all(len(b) <= 64 for b in batches)
    assert all(sum(len(t) for _, t in b) <= 500 for b in batches)
    assert [len(b) for b in plan_batches([("a", "y" * 900), ("b", "z")], 10, 500)] == [1, 1]  # a long one travels alone


def test_texts_are_normalized_truncated_and_hashed_as_sent():
    a = prepare_text(1, "  Caf\u0065\u0301   au  lait ", max_chars=100)
    b = prepare_text(2, "Caf\u00e9 au lait", max_chars=100)
    assert a.text == b.text == "Café au lait" and a.text_hash == b.text_hash and not a.truncated
    long = prepare_text(3, "word " * 100, max_chars=42)
    assert long.truncated and len(long.text) <= 42
    assert prepare_text(4, "   ", 10).text == ""


def test_vectors_are_put_back_in_input_order_and_checked():
    vectors = [np.full(4, i, dtype=np.float32) for i in range(3)]
    matrix, valid, problem = assemble_vectors([(2, vectors[2]), (0, vectors[0]), (1, vectors[1])], 3, 4)
    assert valid.all() and problem is None and [row[0] for row in matrix] == [0, 1, 2]
    with pytest.raises(InvalidOutputError, match="expected 3 vectors"):
        assemble_vectors([(0, vectors[0]), (1, vectors[1])], 3, 4)
    with pytest.raises(InvalidOutputError, match="permutation"):
        assemble_vectors([(0, vectors[0]), (0, vectors[1]), (1, vectors[2])], 3, 4)
    bad = np.array([np.nan, 0, 0, 0], dtype=np.float32)
    _, valid, problem = assemble_vectors([(0, vectors[0]), (1, bad), (2, np.zeros(5, np.float32))], 3, 4)
    assert valid.tolist() == [True, False, False] and "NaN" in problem


def test_breaker_opens_after_n_failures_waits_out_the_outage_and_a_probe_closes_it():
    clock = FakeClock()
    logged: list[str] = []
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0, max_outage_s=100.0, clock=clock, log=logged.append)
    failure = ModelCallError(SERVER_ERROR, "HTTP 503", status=503, retryable=True)
    for _ in range(3):
        breaker.before_call()
        breaker.record_failure(failure)
    assert breaker.state == CircuitBreaker.OPEN and breaker.opens == 1
    assert "circuit open after 3 consecutive failures" in logged[-1] and "wait 10s" in logged[-1]
    # A caller waits for the cool-down (here: until another thread moves the clock) and then probes.
    threading.Timer(0.2, lambda: setattr(clock, "now", clock.now + 10.0)).start()
    assert breaker.before_call() is True and breaker.state == CircuitBreaker.HALF_OPEN
    assert breaker.waited_s >= 10.0
    breaker.record_failure(failure)  # the probe failed: open again, for a doubled cool-down
    assert breaker.state == CircuitBreaker.OPEN and breaker.opens == 2 and "wait 20s" in logged[-1]
    for cooldown in (20.0, 40.0):  # more failed probes: 10 + 20 + 40 = 70 s of outage, cool-down now 60 s
        clock.now += cooldown
        assert breaker.before_call() is True
        breaker.record_failure(failure)
    assert breaker.cooldown_s == 60.0
    # Past max_outage_s, callers stop waiting (their items go to the DLQ) until the next probe.
    clock.now += 35.0
    with pytest.raises(CircuitOpenError, match="max_outage_seconds 100"):
        breaker.before_call()
    clock.now += 25.0
    assert breaker.before_call() is True
    breaker.record_success()
    assert breaker.state == CircuitBreaker.CLOSED and breaker.cooldown_s == 10.0 and "closed" in logged[-1]
    assert breaker.before_call() is False


def test_half_open_lets_one_probe_through_and_holds_the_others():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    breaker.record_failure(ModelCallError(TIMEOUT, "timed out", retryable=True))
    clock.now += 1.0
    breaker.before_call()  # this thread probes
    passed = threading.Event()
    other = threading.Thread(target=lambda: (breaker.before_call(), passed.set()))
    other.start()
    assert not passed.wait(0.3)  # waiting for the probe's verdict
    breaker.record_success()
    assert passed.wait(2)
    other.join()


def timed_slots(throttle: AdaptiveThrottle, count: int) -> float:
    started = time.monotonic()
    for _ in range(count):
        with throttle.slot():
            pass
    return time.monotonic() - started


def test_without_budget_headers_a_429_lowers_rate_and_concurrency_and_successes_grow_them_back():
    assert timed_slots(AdaptiveThrottle(max_concurrency=8), 50) < 0.05  # nothing learned: not paced
    throttle = AdaptiveThrottle(max_concurrency=8)
    for _ in range(20):  # 20 requests in ~0.1 s, then a 429
        with throttle.slot():
            time.sleep(0.005)
    throttle.on_rate_limited(30.0, None)  # a long Retry-After pauses its own request, not the others
    assert throttle.limit == 4 and 0 < throttle.rate < 200
    assert timed_slots(throttle, 1) < throttle.rate**-1 * 2  # the others go on, at the new pace
    rate = throttle.rate
    for _ in range(200):
        throttle.on_success(None)
    assert throttle.limit == 8 and throttle.rate > rate


def test_a_request_that_goes_late_holds_the_next_one_a_period_after_it_not_after_its_own_send_time():
    """On a loaded CPU a request's thread wakes after its send time; the next one, woken on time,
    followed it closer than one period, which a bucket of one request refuses. The bucket counts
    arrivals, so the pace keeps to the times requests actually go."""
    clock = FakeClock()
    oversleep = iter([0.8, 0.0, 0.5, 0.3])  # periods late, then on time

    def sleep(seconds: float) -> None:
        clock.now += seconds + next(oversleep, 0.0) * period

    throttle = AdaptiveThrottle(max_concurrency=8, clock=clock, sleep=sleep)
    throttle.on_success(RateLimitInfo(limit_requests=1, remaining_requests=0, reset_requests_s=1 / 40))
    period = throttle.period  # 40 requests/s at 95 % of it
    sent = []
    for _ in range(8):
        with throttle.slot():
            sent.append(clock.now)
    gaps = [later - earlier for earlier, later in zip(sent, sent[1:])]
    assert min(gaps) >= period * (1 - 1e-9), [round(gap / period, 2) for gap in gaps]
    assert sent[-1] - sent[0] <= 7 * period + 1.6 * period  # late wake-ups cost their own delay, no more


def test_with_budget_headers_the_bucket_mirrors_the_server_and_a_429_empties_it():
    throttle = AdaptiveThrottle(max_concurrency=4)
    # 0 of 10 left, full again in 100 ms: the server's bucket holds 10 and refills 100 requests/s.
    throttle.on_success(RateLimitInfo(limit_requests=10, remaining_requests=0, reset_requests_s=0.1))
    assert (throttle.burst, round(throttle.rate)) == (10.0, 100)
    elapsed = timed_slots(throttle, 12)
    assert 12 / 100 <= elapsed <= 0.5  # no burst left: ~10.5 ms apart (95 % of the refill rate)
    time.sleep(0.15)  # the bucket refills to its capacity, no further
    assert timed_slots(throttle, 10) < 0.03 and timed_slots(throttle, 5) >= 4 / 100
    # A strict server (a bucket of one request): one at a time, never two at once.
    strict = AdaptiveThrottle(max_concurrency=8)
    strict.on_success(RateLimitInfo(limit_requests=1, remaining_requests=0, reset_requests_s=0.02))
    assert strict.burst == 1.0 and timed_slots(strict, 6) >= 5 * 0.02
    strict.on_rate_limited(0.02, RateLimitInfo(limit_requests=1, remaining_requests=0, reset_requests_s=0.02))
    assert strict.limit == 8  # the rate is known: a 429 is jitter, not a reason to shrink concurrency
