"""One redaction rule for everything that leaves the warehouse: errors, alerts, sensor cursors,
logs, metadata. It removes secrets and masks personal data.

Personal data: an email address anywhere in a text is masked (`c***@example.com`); the columns
the source registry declares personal are masked by name in previews (`mask_column`), an
identifier as a stable pseudonym (`pseudonym`) so that a preview can still be joined by eye.

A secret is recognised four ways: it is a value the caller knows (the API key it holds), the value
of an environment variable with a secret-looking name, the value under a secret-looking key of a
mapping, or text shaped like a credential (`Bearer ...`, `api_key=...`, `sk-...`, the password of
`user:password@host`). Error messages can quote a key nobody put in the environment (a key typed
into a config, a bearer header echoed by a server), hence the shapes.
"""

from __future__ import annotations

import hashlib
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


# Practical, not RFC-complete: what people and generators write, with a dot in the domain.
EMAIL = re.compile(r"(?<![\w.+'-])([\w.+'-])[\w.+'-]*@((?:[\w-]+\.)+[\w-]{2,})", re.UNICODE)


def mask_emails(text: str) -> str:
    """Every email address in `text` as its first character and domain: c***@example.com."""
    return EMAIL.sub(lambda m: f"{m.group(1)}{MASK}@{m.group(2)}", text)


def pseudonym(value: object) -> str:
    """A stable stand-in for an identifier: the same id always gives the same pseudonym."""
    return "id:" + hashlib.sha256(str(value).encode()).hexdigest()[:12]


def mask_column(value: object, how: str) -> object:
    """A value of a personal column as it may leave the warehouse ("mask" or "hash")."""
    if value is None:
        return None
    if how == "hash":
        return pseudonym(value)
    text = str(value)
    masked = mask_emails(text)
    return masked if masked != text else (text[:1] + MASK if text else text)


def redact_text(text: str, secrets: Iterable[str | None] = (), limit: int | None = None) -> str:
    """`text` with every recognisable secret and email address masked, cut to `limit` characters
    when given."""
    known = [s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH] + _secret_env_values()
    for secret in sorted(known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for shape, replacement in SECRET_SHAPES:
        text = shape.sub(replacement, text)
    text = mask_emails(text)
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
