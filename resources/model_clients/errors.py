"""What went wrong in a model call, in one vocabulary for every client: the reason class that
lands in the dead-letter queue, a finer cause for the retry counters, and whether trying again
can help."""

from __future__ import annotations

# Reason classes of the dead-letter queue (resources/dead_letters.py), re-exported for the clients.
from resources.dead_letters import (  # noqa: F401
    CIRCUIT_OPEN,
    CLIENT_ERROR,
    INVALID_OUTPUT,
    PROCESSING_ERROR,
    RATE_LIMITED,
    REASON_CLASSES,
    SERVER_ERROR,
    TIMEOUT,
)

# Finer causes, for `retries_by_cause` (a dropped connection is a server_error in the DLQ).
CONNECTION_ERROR = "connection_error"
ENCODING_FALLBACK = "encoding_fallback"  # a server without base64 vectors: asked again for floats

# 400 and 422 blame the inputs, so a batch is split to isolate the bad one; other 4xx blame
# the configuration (key, model, URL) and fail the whole batch at once.
INPUT_REJECTED_STATUSES = frozenset({400, 413, 422})
CONFIGURATION_STATUSES = frozenset({401, 403, 404})


class ModelCallError(Exception):
    """A failed model call. The message never carries credentials (resources/redaction.py)."""

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
        self.during_outage = False  # set on a failed probe of an open breaker: no request's fault

    @property
    def blames_inputs(self) -> bool:
        return self.status in INPUT_REJECTED_STATUSES

    @property
    def blames_configuration(self) -> bool:
        """The key, the model, the deployment or the URL is wrong: no item is at fault, and no
        retry or wait can help."""
        return self.status in CONFIGURATION_STATUSES

    @property
    def counts_against_breaker(self) -> bool:
        """Failures that say the endpoint is down or unusable, not that one input was bad."""
        return self.reason_class in (SERVER_ERROR, TIMEOUT) or self.status in CONFIGURATION_STATUSES


CONFIGURATION_ADVICE = {
    401: "the API key was refused: check OPENAI_API_KEY (and, on Azure, that it belongs to this resource)",
    403: "the key may not use this model or deployment: check its permissions and the organization/project",
    404: "no such model, deployment or URL: check EMBEDDING_MODEL / CHAT_MODEL, AZURE_OPENAI_DEPLOYMENT and "
         "OPENAI_BASE_URL",
}


class ModelConfigurationError(ModelCallError):
    """The endpoint refused the request as configured (401/403/404). The step fails with this:
    dead-lettering the items would blame them for a wrong key or model name."""

    def __init__(self, error: ModelCallError, provider: str, model: str) -> None:
        advice = CONFIGURATION_ADVICE.get(error.status or 0, "check the model endpoint's configuration")
        message = (f"{provider} model {model!r} refused the request as configured ({error.message}): {advice}. "
                   "Nothing was dead-lettered; fix the configuration and re-run: a plain re-run requests "
                   "everything that is still missing.")
        super().__init__(error.reason_class, message, status=error.status, cause=error.cause)


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
