"""One redaction rule for everything that leaves the warehouse: errors, alerts, sensor cursors, logs.

A secret is recognised four ways: it is a value the caller knows (the API key it holds), the value
of an environment variable with a secret-looking name, the value under a secret-looking key of a
mapping, or text shaped like a credential (`Bearer ...`, `api_key=...`, `sk-...`, the password of
`user:password@host`). Error messages can quote a key nobody put in the environment (a key typed
into a config, a bearer header echoed by a server), hence the shapes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|passwd|credential|authorization|bearer|token|webhook_url)", re.I)
SECRET_ENV = re.compile(r"(key|token|secret|password|passwd|credential|auth|webhook)", re.I)
MIN_SECRET_LENGTH = 4
MIN_ENV_SECRET_LENGTH = 6  # shorter env values ("1", "true") would mask ordinary words

SECRET_SHAPES = (
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._\-~+/=]{4,}"), rf"\g<1>{MASK}"),
    (re.compile(r"(?i)(api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"), rf"\g<1>{MASK}"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}"), MASK),  # OpenAI-style keys
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+@"), rf"\g<1>{MASK}@"),  # user:password@host
)


def redact_text(text: str, secrets: Iterable[str | None] = (), limit: int | None = None) -> str:
    """`text` with every recognisable secret masked, cut to `limit` characters when given."""
    known = [s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH] + _secret_env_values()
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for shape, replacement in SECRET_SHAPES:
        text = shape.sub(replacement, text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def redact(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """A JSON-able copy of `value` with secrets masked: values under secret-looking keys, and
    every string by `redact_text`."""
    secrets = tuple(secrets)
    if isinstance(value, dict):
        return {str(k): MASK if SECRET_KEY.search(str(k)) else redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, secrets) for v in value]
    if isinstance(value, str):
        return redact_text(value, secrets)
    return value


def _secret_env_values() -> list[str]:
    return [v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= MIN_ENV_SECRET_LENGTH]
