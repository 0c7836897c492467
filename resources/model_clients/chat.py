"""The chat session: JSON answers from a chat model for the optional LLM steps.

Same resilience as embeddings (retries, throttle, breaker, dead letters). A reply that is not a
JSON object, or that the caller's `validate` rejects, is `invalid_output`: retried, then
dead-lettered, never returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from resources import dead_letters
from resources.dead_letters import DeadLetter
from resources.model_clients.base import ChatClient, ChatResponse
from resources.model_clients.errors import CircuitOpenError, InvalidOutputError, ModelCallError, ModelConfigurationError
from resources.model_clients.metrics import CallMetrics
from resources.model_clients.resilience import ResilientCaller
from resources.model_clients.texts import chunked, estimate_tokens
from resources.warehouse import DuckDBWarehouse

Messages = Sequence[Mapping[str, str]]


@dataclass
class ChatReport:
    stage: str
    partition_key: str
    metrics: CallMetrics
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dlq_count(self) -> int:
        return self.metrics.dlq_count

    def to_metadata(self) -> dict[str, Any]:
        return self.metrics.to_metadata()


class ChatSession:
    def __init__(
        self,
        client: ChatClient,
        caller: ResilientCaller,
        max_concurrency: int,
        price_per_1k_tokens: float = 0.0,
        log: logging.Logger | Any | None = None,
    ) -> None:
        self.client = client
        self.caller = caller
        self.max_concurrency = max(1, min(max_concurrency, client.max_parallel_requests or max_concurrency))
        self.price_per_1k_tokens = price_per_1k_tokens
        self.log = log or logging.getLogger(__name__)

    def new_metrics(self) -> CallMetrics:
        return CallMetrics(self.client.provider, self.client.model, self.price_per_1k_tokens)

    def complete_json(
        self,
        messages: Messages,
        validate: Callable[[dict[str, Any]], bool] | None = None,
        metrics: CallMetrics | None = None,
    ) -> dict[str, Any]:
        """One JSON object for one conversation, with retries; raises ModelCallError."""
        metrics = metrics or self.new_metrics()
        estimated = sum(estimate_tokens(str(m.get("content", ""))) for m in messages)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.caller.attempt(lambda: self._checked(messages, validate), metrics, estimated)
                return response.data
            except CircuitOpenError:
                raise
            except ModelCallError as error:
                if self.caller.free_retry(error, metrics, self.client.provider, self.client.model):
                    attempt -= 1  # a failed outage probe spends no attempt
                    continue
                if not self.caller.pause_before_retry(attempt, error, metrics):
                    error.attempts = attempt  # type: ignore[attr-defined]
                    raise

    def complete_items(
        self,
        warehouse: DuckDBWarehouse,
        items: Iterable[tuple[object, Messages]],
        *,
        stage: str,
        partition_key: str | None = None,
        validate: Callable[[dict[str, Any]], bool] | None = None,
        chunk_size: int = 256,
    ) -> ChatReport:
        """Answer every (item_key, messages); failures go to ops.dead_letter, the rest are returned."""
        partition = partition_key or ""
        metrics = self.new_metrics()
        report = ChatReport(stage, partition, metrics)
        model_id = f"{self.client.provider}:{self.client.model}"
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="chat") as executor:
            for chunk in chunked(items, chunk_size):
                metrics.items += len(chunk)
                answered, letters = [], []
                for key, data, letter in executor.map(lambda item: self._one(item, validate, metrics), chunk):
                    if letter is None:
                        report.results[key] = data  # type: ignore[assignment]
                        answered.append(key)
                    else:
                        letters.append(letter)
                        metrics.record_dead_letters(letter.reason_class)
                # Short connections between chunks, none while the model is being called.
                with warehouse.transaction() as con:
                    dead_letters.write(con, stage, partition, model_id, letters)
                    dead_letters.resolve_keys(con, stage, answered)
        metrics.finish()
        self.log.info(f"chat {stage}/{partition or '-'}: {len(report.results)} answers, {metrics.dlq_count} dead-lettered")
        return report

    def _one(
        self, item: tuple[object, Messages], validate: Callable[[dict[str, Any]], bool] | None, metrics: CallMetrics
    ) -> tuple[str, dict[str, Any] | None, DeadLetter | None]:
        key, messages = str(item[0]), item[1]
        try:
            return key, self.complete_json(messages, validate, metrics), None
        except ModelConfigurationError:
            raise
        except ModelCallError as error:
            payload_hash = hashlib.sha256(json.dumps(list(map(dict, messages)), sort_keys=True).encode()).hexdigest()
            attempts = getattr(error, "attempts", 0)
            return key, None, DeadLetter(key, error.reason_class, error.message, attempts, payload_hash)

    def _checked(self, messages: Messages, validate: Callable[[dict[str, Any]], bool] | None) -> ChatResponse:
        response = self.client.complete_json(messages)
        if validate is not None and not validate(response.data):
            raise InvalidOutputError("reply failed validation")
        return response
