"""OpenAI-compatible clients over the `openai` SDK: OpenAI, Azure OpenAI, self-hosted servers.

- The SDK is built with `max_retries=0`: resilience.py is the only retry layer (see there), and
  `timeout` is our per-request timeout (the SDK default would be 600 s).
- Embeddings ask for `encoding_format="base64"` (~10x cheaper to parse than JSON floats). A
  server that answers floats anyway is read as floats; one that rejects base64 with 400/422
  before ever accepting it is asked again with floats, and the client stays on floats.
- Answers are read raw (`with_raw_response`) so the rate-limit headers reach the throttle and
  every vector is checked before anyone sees it (see base.assemble_vectors).
- SDK exceptions are translated into ModelCallError with a redacted message and no chained
  cause: the SDK's exception holds the request, and the request holds the API key.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import openai

from resources.model_clients.base import (
    ChatClient,
    ChatResponse,
    EmbeddingClient,
    EmbeddingResponse,
    RateLimitInfo,
    assemble_vectors,
    parse_retry_after,
)
from resources.redaction import redact_text
from resources.model_clients.errors import (
    CLIENT_ERROR,
    CONNECTION_ERROR,
    ENCODING_FALLBACK,
    SERVER_ERROR,
    TIMEOUT,
    InvalidOutputError,
    ModelCallError,
    classify_status,
)

T = TypeVar("T")

# Self-hosted servers often accept any key but the SDK insists on one.
PLACEHOLDER_API_KEY = "not-needed"


def build_sdk_client(
    *,
    base_url: str | None,
    api_key: str | None,
    timeout_s: float,
    azure_api_version: str | None = None,
    azure_deployment: str | None = None,
) -> openai.OpenAI:
    common: dict[str, Any] = {"api_key": api_key or PLACEHOLDER_API_KEY, "max_retries": 0, "timeout": timeout_s}
    if azure_api_version:
        if not base_url:
            raise ValueError("Azure OpenAI needs base_url set to the resource endpoint (https://<name>.openai.azure.com)")
        return openai.AzureOpenAI(
            azure_endpoint=base_url, azure_deployment=azure_deployment or None, api_version=azure_api_version, **common
        )
    return openai.OpenAI(base_url=base_url or None, **common)


def call_translating_errors(call: Callable[[], T], secrets: Sequence[str | None]) -> T:
    """Run an SDK call; SDK failures come out as ModelCallError, with secrets redacted."""
    try:
        return call()
    except openai.APIError as error:
        translated = translate_sdk_error(error, secrets)
    # Raised outside the except block so the SDK's exception is not even the implicit context.
    raise translated


def translate_sdk_error(error: openai.APIError, secrets: Sequence[str | None]) -> ModelCallError:
    if isinstance(error, openai.APITimeoutError):
        return ModelCallError(TIMEOUT, "request timed out", retryable=True)
    if isinstance(error, openai.APIConnectionError):
        detail = type(error.__cause__).__name__ if error.__cause__ else "connection error"
        return ModelCallError(SERVER_ERROR, f"connection failed ({detail})", cause=CONNECTION_ERROR, retryable=True)
    if isinstance(error, openai.APIStatusError):
        reason, retryable = classify_status(error.status_code)
        headers = error.response.headers
        return ModelCallError(
            reason,
            redact_text(f"HTTP {error.status_code}: {error.message}", secrets, limit=500),
            status=error.status_code,
            retryable=retryable,
            retry_after=parse_retry_after(headers),
            rate_limit=RateLimitInfo.from_headers(headers),
        )
    return ModelCallError(SERVER_ERROR, redact_text(f"{type(error).__name__}: {error}", secrets, limit=500), retryable=False)


def _json_body(content: bytes) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        raise InvalidOutputError(f"response is not valid JSON ({len(content)} bytes)") from None
    if not isinstance(body, dict):
        raise InvalidOutputError("response JSON is not an object")
    return body


def _usage_tokens(body: Mapping[str, Any], field: str) -> int | None:
    usage = body.get("usage")
    value = usage.get(field) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


def decode_vector(value: object) -> np.ndarray | None:
    """A vector from base64 (little-endian float32) or a JSON list of numbers; None if neither."""
    try:
        if isinstance(value, str):
            raw = base64.b64decode(value, validate=True)
            return np.frombuffer(raw, dtype="<f4").astype(np.float32) if len(raw) % 4 == 0 else None
        if isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            return np.asarray(value, dtype=np.float32)
    except (binascii.Error, ValueError):
        return None
    return None


class OpenAIEmbeddingClient(EmbeddingClient):
    provider = "openai"

    def __init__(
        self,
        sdk: openai.OpenAI,
        *,
        model: str,
        dimensions: int,
        send_dimensions: bool,
        encoding_format: str = "base64",
        secrets: Sequence[str | None] = (),
    ) -> None:
        self._sdk = sdk
        self.model = model
        self.dimensions = dimensions
        self._send_dimensions = send_dimensions
        self._encoding = encoding_format
        self._base64_confirmed = False
        self._secrets = tuple(secrets)
        self._lock = threading.Lock()
        self.encoding_fallbacks = 0

    @property
    def encoding_format(self) -> str:
        return self._encoding

    def embed(self, texts: Sequence[str]) -> EmbeddingResponse:
        encoding = self._encoding
        try:
            response = self._request(texts, encoding)
        except ModelCallError as error:
            if not (encoding == "base64" and error.blames_inputs and not self._base64_confirmed):
                raise
            with self._lock:  # the server may not speak base64: the caller's retry (counted) asks for floats
                self._encoding = "float"
                self.encoding_fallbacks += 1
            raise ModelCallError(CLIENT_ERROR, f"base64 vectors refused ({error.message}); switching to floats",
                                 cause=ENCODING_FALLBACK, retryable=True) from None
        if encoding == "base64":
            self._base64_confirmed = True
        return response

    def _request(self, texts: Sequence[str], encoding: str) -> EmbeddingResponse:
        options: dict[str, Any] = {"input": list(texts), "model": self.model, "encoding_format": encoding}
        if self._send_dimensions:
            options["dimensions"] = self.dimensions
        raw = call_translating_errors(lambda: self._sdk.embeddings.with_raw_response.create(**options), self._secrets)
        body = _json_body(raw.content)
        data = body.get("data")
        if not isinstance(data, list):
            raise InvalidOutputError("response has no `data` list")
        rows = [_row(item) for item in data]
        vectors, valid, problem = assemble_vectors(rows, len(texts), self.dimensions)
        return EmbeddingResponse(
            vectors, valid, _usage_tokens(body, "prompt_tokens"), RateLimitInfo.from_headers(raw.headers), problem
        )

    def close(self) -> None:
        self._sdk.close()


def _row(item: object) -> tuple[Any, np.ndarray | None]:
    if not isinstance(item, dict):
        raise InvalidOutputError("a `data` entry is not an object")
    return item.get("index"), decode_vector(item.get("embedding"))


class OpenAIChatClient(ChatClient):
    provider = "openai"

    def __init__(
        self,
        sdk: openai.OpenAI,
        *,
        model: str,
        json_mode: bool = True,
        temperature: float = 0.0,
        max_output_tokens: int | None = None,
        secrets: Sequence[str | None] = (),
    ) -> None:
        self._sdk = sdk
        self.model = model
        self._json_mode = json_mode
        self._temperature = temperature
        self._max_output_tokens = max_output_tokens
        self._secrets = tuple(secrets)

    def complete_json(self, messages: Sequence[Mapping[str, str]]) -> ChatResponse:
        options: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in messages]}
        options["temperature"] = self._temperature
        if self._json_mode:
            options["response_format"] = {"type": "json_object"}
        if self._max_output_tokens:
            options["max_tokens"] = self._max_output_tokens
        raw = call_translating_errors(lambda: self._sdk.chat.completions.with_raw_response.create(**options), self._secrets)
        body = _json_body(raw.content)
        data = parse_json_object(_reply_text(body))
        return ChatResponse(data, _usage_tokens(body, "total_tokens"), RateLimitInfo.from_headers(raw.headers))

    def close(self) -> None:
        self._sdk.close()


def _reply_text(body: Mapping[str, Any]) -> str:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise InvalidOutputError("response has no choices[0].message.content") from None
    if not isinstance(content, str):
        raise InvalidOutputError("reply content is not text")
    return content


def parse_json_object(text: str) -> dict[str, Any]:
    """The reply as a JSON object; a ```json fence around it is tolerated, nothing else is."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        raise InvalidOutputError(f"reply is not valid JSON ({len(text)} characters)") from None
    if not isinstance(value, dict):
        raise InvalidOutputError("reply JSON is not an object")
    return value
