"""What a sensor raises: one problem, with a stable dedup key, already free of secrets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from resources.redaction import redact

WARN = "WARN"
ERROR = "ERROR"
MAX_DETAIL_TEXT = 2_000  # a stack or a markdown preview must not swamp a chat message or a table row


def _shorten(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_DETAIL_TEXT:
        return value[: MAX_DETAIL_TEXT - 1] + "…"
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    return value


@dataclass(frozen=True)
class Alert:
    """`dedup_key` names the incident, the problem (cause, asset, partition), not the tick or the
    run: while an incident is open it is raised once. An alert with `resolves` set is the notice
    that closes it (sent only if it was open)."""

    dedup_key: str
    rule: str
    severity: str
    message: str
    asset: str | None = None
    partition: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    resolves: bool = False

    @classmethod
    def create(cls, dedup_key: str, rule: str, severity: str, message: str, **kwargs: Any) -> Alert:
        """The only way sensors build alerts: text and details are redacted and bounded here."""
        details = _shorten(redact(kwargs.pop("details", {}) or {}))
        return cls(dedup_key, rule, severity, redact(message), details=details, **kwargs)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Alert:
        return cls(**data)
