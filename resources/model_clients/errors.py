"""What went wrong in a model call, in one vocabulary for every client: the reason class that
lands in the dead-letter queue, a finer cause for the retry counters, and whether trying again
can help."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Reason classes of ops.dead_letter.
RATE_LIMITED = "rate_limited"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
INVALID_OUTPUT = "invalid_output"
CLIENT_ERROR = "client_error"
CIRCUIT_OPEN = "circuit_open"
# Not a model call: a pipeline step's own computation failed for these items (e.g. a chunk of
# customers the recommender could not score); they share the dead-letter queue.
PROCESSING_ERROR = "processing_error"
REASON_CLASSES = (RATE_LIMITED, SERVER_ERROR, TIMEOUT, INVALID_OUTPUT, CLIENT_ERROR, CIRCUIT_OPEN, PROCESSING_ERROR)

# Finer causes, for `retries_by_cause` (a dropped connection is a server_error in the DLQ).
CONNECTION_ERROR = "connection_error"

# 400 and 422 blame the inputs, so a batch is split to isolate the bad one; other 4xx blame
# the configuration (key, model, URL) and fail the whole batch at once.
INPUT_REJECTED_STATUSES = frozenset({400, 413, 422})
CONFIGURATION_STATUSES = frozenset({401, 403, 404})


class ModelCallError(Exception):
    """A failed model call. The message never carries credentials (see `redact`)."""

    def __init__(
        self,
        reason_class: str,
        message: str,
        *,
        cause: str | None = None,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        rate_limit: object | None = None,
    ) -> None:
        super().__init__(message)
        self.reason_class = reason_class
        self.message = message
        self.cause = cause or reason_class
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.rate_limit = rate_limit

    @property
    def blames_inputs(self) -> bool:
        return self.status in INPUT_REJECTED_STATUSES

    @property
    def counts_against_breaker(self) -> bool:
        """Failures that say the endpoint is down or unusable, not that one input was bad."""
        return self.reason_class in (SERVER_ERROR, TIMEOUT) or self.status in CONFIGURATION_STATUSES


class InvalidOutputError(ModelCallError):
    """The model answered, but the answer cannot be trusted (worth one more try)."""

    def __init__(self, message: str) -> None:
        super().__init__(INVALID_OUTPUT, message, retryable=True)


class CircuitOpenError(ModelCallError):
    def __init__(self, message: str) -> None:
        super().__init__(CIRCUIT_OPEN, message, retryable=False)


def classify_status(status: int) -> tuple[str, bool]:
    """(reason class, retryable) for an HTTP status."""
    if status == 429:
        return RATE_LIMITED, True
    if status == 408:
        return TIMEOUT, True
    if status == 409 or status >= 500:  # 409: a lock or conflict on the server side, transient
        return SERVER_ERROR, True
    return CLIENT_ERROR, False


_TOKEN_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[^\s\"',;]+"),
    re.compile(r"(?i)(api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"),
    re.compile(r"()\bsk-[A-Za-z0-9_\-]{6,}"),
)


def redact(text: str, secrets: Iterable[str | None] = (), limit: int = 500) -> str:
    """Remove credentials from a message: the known secrets, and anything shaped like a key."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(lambda m: f"{m.group(1)}***", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
