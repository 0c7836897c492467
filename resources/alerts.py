"""Alerts: every alert goes to the log and to `ops.alerts`, and to a webhook and Slack (through
dagster-slack) when they are set.

The webhook is best effort: bounded retries with backoff, and a webhook that is down is recorded
on the alert row (`webhook_status = 'failed'`), never raised into the pipeline. The webhook URL
is a secret (chat webhooks embed their token): it comes from `dg.EnvVar` and never appears in a
log line, an exception or the table. Title, message and details pass resources/redaction.py.

The resource opens its own short warehouse connection, so call it after closing yours.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

import dagster as dg
from pydantic import Field

from resources.redaction import redact, redact_text
from resources.warehouse import DuckDBWarehouse

SEVERITIES = ("INFO", "WARN", "ERROR")
MAX_RETRY_AFTER_SECONDS = 30.0

ALERTS_DDL = """
CREATE TABLE IF NOT EXISTS ops.alerts (
    alert_id VARCHAR,
    raised_at TIMESTAMP,
    severity VARCHAR,
    source VARCHAR,
    title VARCHAR,
    message VARCHAR,
    details JSON,
    webhook_status VARCHAR,   -- not_configured | delivered | failed
    webhook_attempts INTEGER,
    webhook_error VARCHAR     -- why delivery failed (status or error class; never the URL)
)"""
# delivered, failed: why, or not_configured
SLACK_COLUMN = "ALTER TABLE ops.alerts ADD COLUMN IF NOT EXISTS slack_status VARCHAR"


@dataclass(frozen=True)
class AlertRecord:
    alert_id: str
    raised_at: dt.datetime
    severity: str
    source: str
    title: str
    message: str
    details: dict[str, Any]
    webhook_status: str = "not_configured"
    webhook_attempts: int = 0
    webhook_error: str | None = None
    slack_status: str = "not_configured"

    def payload(self) -> dict[str, Any]:
        data = asdict(self)
        data["raised_at"] = self.raised_at.isoformat()
        for key in ("webhook_status", "webhook_attempts", "webhook_error", "slack_status"):
            data.pop(key)
        return data

    def slack_text(self) -> str:
        where = " ".join(f"{k}={self.details[k]}" for k in ("asset", "partition") if self.details.get(k))
        return f"*{self.severity}* {self.title}\n{self.message}" + (f"\n_{where}_" if where else "")


class Alerts(dg.ConfigurableResource):
    """Raise alerts to the log, the `ops.alerts` table and an optional webhook."""

    warehouse: DuckDBWarehouse
    webhook_url: str | None = Field(
        default=None, repr=False, description="POST target for alerts (a secret: chat webhooks embed a token); set it with dg.EnvVar.")
    webhook_timeout_seconds: float = Field(default=5.0, description="Timeout of one webhook request.")
    webhook_attempts: int = Field(default=3, description="Tries per alert before it is recorded as undelivered.")
    webhook_backoff_seconds: float = Field(default=0.5, description="First wait between tries; doubles each time.")
    slack_token: str | None = Field(
        default=None, repr=False, description="Slack bot token (dg.EnvVar('SLACK_BOT_TOKEN')); with slack_channel, alerts go to Slack too.")
    slack_channel: str | None = Field(default=None, description="Slack channel for alerts (SLACK_CHANNEL).")
    slack_api_url: str = Field(default="https://slack.com/api/", description="Slack Web API base URL (a proxy, or a test receiver).")

    def send(self, severity: str | dg.AssetCheckSeverity, source: str, title: str, message: str,
             details: dict[str, Any] | None = None, log: logging.Logger | None = None) -> AlertRecord:
        """Raise one alert; returns what was recorded. Never raises because the webhook is down."""
        alert = self.notify(severity, source, title, message, details, log)
        self.record(alert)
        return alert

    def notify(self, severity: str | dg.AssetCheckSeverity, source: str, title: str, message: str,
               details: dict[str, Any] | None = None, log: logging.Logger | None = None) -> AlertRecord:
        """The log line and the webhook of `send`, without the table row (sensors record it apart)."""
        alert = AlertRecord(
            alert_id=str(uuid.uuid4()),
            raised_at=dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
            severity=_severity(severity),
            source=source,
            title=redact_text(title),
            message=redact_text(message),
            details=redact(details or {}),
        )
        logger = log or dg.get_dagster_logger()
        logger.log(_log_level(alert.severity), f"ALERT {alert.severity} [{source}] {alert.title}: {alert.message}")
        if self.webhook_url:
            alert = self._deliver(alert, logger)
        if self.slack_token and self.slack_channel:
            alert = replace(alert, slack_status=self._post_to_slack(alert, logger))
        return alert

    def _post_to_slack(self, alert: AlertRecord, logger: logging.Logger) -> str:
        """Through dagster-slack's client; a Slack that refuses or is unreachable never fails the caller."""
        from dagster_slack import SlackResource
        from slack_sdk.errors import SlackApiError

        client = SlackResource(token=self.slack_token).get_client()
        client.base_url = self.slack_api_url
        client.timeout = int(self.webhook_timeout_seconds)
        try:
            client.chat_postMessage(channel=self.slack_channel, text=alert.slack_text())
            return "delivered"
        except SlackApiError as failure:
            reason = f"failed: {failure.response.get('error', 'error')}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as failure:
            reason = f"failed: {type(failure).__name__}"  # the class only: messages may quote the token
        logger.warning(f"alert {alert.alert_id} not delivered to Slack: {reason}")
        return reason

    def _deliver(self, alert: AlertRecord, logger: logging.Logger) -> AlertRecord:
        body = json.dumps(alert.payload(), default=str).encode()
        error, attempts = None, 0
        for attempt in range(1, max(self.webhook_attempts, 1) + 1):
            attempts = attempt
            error, retry_after = self._post_once(body)
            if error is None:
                return _with_delivery(alert, "delivered", attempts, None)
            if retry_after is None or attempt == self.webhook_attempts:
                break
            time.sleep(max(retry_after, self.webhook_backoff_seconds * 2 ** (attempt - 1)))
        logger.warning(f"alert {alert.alert_id} not delivered to the webhook after {attempts} tries: {error}")
        return _with_delivery(alert, "failed", attempts, error)

    def _post_once(self, body: bytes) -> tuple[str | None, float | None]:
        """(None, None) when delivered; else (why, seconds to wait or None when retrying is pointless)."""
        try:
            request = urllib.request.Request(
                self.webhook_url, data=body, method="POST", headers={"Content-Type": "application/json"})
        except ValueError:  # not a URL urllib can open; its message quotes the URL, a secret
            return "ValueError: the webhook URL is not an http(s) URL", None
        try:
            with urllib.request.urlopen(request, timeout=self.webhook_timeout_seconds) as response:
                response.read()
            return None, None
        except urllib.error.HTTPError as failure:
            retryable = failure.code == 429 or failure.code >= 500
            return f"HTTP {failure.code}", _retry_after(failure.headers.get("Retry-After")) if retryable else None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as failure:
            reason = getattr(failure, "reason", failure)
            # The error class only: some messages quote the URL, and the URL is a secret.
            return f"{type(failure).__name__}: {type(reason).__name__}", 0.0

    def record(self, alert: AlertRecord, lock_timeout_seconds: float | None = None) -> None:
        """Write the alert's row. A sensor passes a short lock timeout: rather than wait behind a
        pipeline step it gets `WarehouseLockTimeout` and writes the row on a later tick."""
        warehouse = self.warehouse
        if lock_timeout_seconds is not None:
            warehouse = warehouse.model_copy(update={"lock_timeout_seconds": lock_timeout_seconds})
        with warehouse.transaction() as con:
            con.execute("CREATE SCHEMA IF NOT EXISTS ops")
            con.execute(ALERTS_DDL)
            con.execute(SLACK_COLUMN)
            con.execute(
                """INSERT INTO ops.alerts (alert_id, raised_at, severity, source, title, message, details,
                       webhook_status, webhook_attempts, webhook_error, slack_status)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [alert.alert_id, alert.raised_at, alert.severity, alert.source, alert.title, alert.message,
                 json.dumps(alert.details, default=str), alert.webhook_status, alert.webhook_attempts,
                 alert.webhook_error, alert.slack_status],
            )


def _with_delivery(alert: AlertRecord, status: str, attempts: int, error: str | None) -> AlertRecord:
    return AlertRecord(**{**asdict(alert), "webhook_status": status, "webhook_attempts": attempts,
                          "webhook_error": error})


def _retry_after(header: str | None) -> float:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), bounded."""
    if not header:
        return 0.0
    try:
        seconds = float(header)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return 0.0
        seconds = (when - dt.datetime.now(when.tzinfo)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _severity(severity: str | dg.AssetCheckSeverity) -> str:
    value = severity.value if isinstance(severity, dg.AssetCheckSeverity) else str(severity).upper()
    value = "WARN" if value == "WARNING" else value
    if value not in SEVERITIES:
        raise ValueError(f"unknown alert severity {severity!r}; expected one of {SEVERITIES}")
    return value


def _log_level(severity: str) -> int:
    return {"INFO": logging.INFO, "WARN": logging.WARNING, "ERROR": logging.ERROR}[severity]
