"""Secrets never leave in an alert, nor sit in a sensor cursor (the UI shows cursors).

The `Alerts` resource masks secret-named keys and the values of secret env vars; error messages
from runs can also quote a key nobody put in the environment (a key typed into a config, a
bearer header in an HTTP error, a password in a URL), so those are masked by their shape too.
"""

from __future__ import annotations

import re
from typing import Any

from resources.alerts import MASK, redact as redact_named_secrets

SECRET_SHAPES = [
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), MASK),  # OpenAI-style keys
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._\-~+/=]{8,}"), f"Bearer {MASK}"),
    (re.compile(r"(://[^/\s:@]+:)[^@\s/]+@"), rf"\g<1>{MASK}@"),  # user:password@host
]


def _mask_shapes(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask_shapes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_shapes(v) for v in value]
    if isinstance(value, str):
        for shape, replacement in SECRET_SHAPES:
            value = shape.sub(replacement, value)
    return value


def redact(value: Any) -> Any:
    """A JSON-able copy of `value` with every secret we can recognise masked."""
    return _mask_shapes(redact_named_secrets(value))
