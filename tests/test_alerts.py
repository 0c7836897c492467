"""Alerts reach the log, ops.alerts and a real webhook on 127.0.0.1; a dead webhook breaks nothing."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from assets.monitor.check_alerts import asset_check_failure_alerts
from assets.monitor.settings import MonitoringSettings
from generator import FaultRates
from resources.alerts import Alerts
from resources.warehouse import fetch_all
from tests.conftest import free_port
from tests.ingestion_support import RAW, check_results, day, generate_landing, raw_resources


class Webhook:
    """A local HTTP server recording JSON posts; answers with the queued statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None):
        self.received: list[dict] = []
        self.statuses = list(statuses or [])
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = owner.statuses.pop(0) if owner.statuses else 200
                if status == 200:
                    owner.received.append(json.loads(body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/secret-token-123456"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Webhook":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"


def alert_rows(warehouse) -> list[tuple]:
    with warehouse.connect(read_only=True) as con:
        return fetch_all(con, """SELECT severity, source, title, message, details, webhook_status, webhook_attempts,
                                 webhook_error FROM ops.alerts ORDER BY raised_at""")


def quick_alerts(warehouse, url: str | None, attempts: int = 3) -> Alerts:
    return Alerts(warehouse=warehouse, webhook_url=url, webhook_attempts=attempts, webhook_backoff_seconds=0.01,
                  webhook_timeout_seconds=2)


def test_an_alert_goes_to_the_table_and_the_webhook(warehouse):
    with Webhook() as hook:
        record = quick_alerts(warehouse, hook.url).send("ERROR", "raw_customers", "too many errors", "7 % quarantined",
                                                        details={"error_rate": 0.07})
    (posted,) = hook.received
    assert posted["severity"] == "ERROR" and posted["details"] == {"error_rate": 0.07}
    assert posted["alert_id"] == record.alert_id
    ((severity, source, title, message, details, status, attempts, error),) = alert_rows(warehouse)
    assert (severity, source, title, status, attempts, error) == ("ERROR", "raw_customers", "too many errors",
                                                                  "delivered", 1, None)
    assert json.loads(details) == {"error_rate": 0.07}


def test_server_errors_are_retried_with_backoff(warehouse):
    with Webhook(statuses=[503, 500]) as hook:
        record = quick_alerts(warehouse, hook.url).send("WARN", "test", "flaky", "webhook recovers")
    assert record.webhook_status == "delivered" and record.webhook_attempts == 3 and len(hook.received) == 1


def test_a_down_webhook_is_recorded_and_never_raised(warehouse):
    url = closed_port_url()
    record = quick_alerts(warehouse, url, attempts=2).send("ERROR", "test", "webhook down", "still recorded")
    assert record.webhook_status == "failed" and record.webhook_attempts == 2
    ((*_, status, attempts, error),) = alert_rows(warehouse)
    assert status == "failed" and attempts == 2 and "127.0.0.1" not in error


def test_a_webhook_url_that_is_no_url_is_recorded_not_raised_and_stops_the_code_location(warehouse, monkeypatch):
    secret = "hooks.example.com/T000/B000/secret-token"  # the scheme forgotten
    record = quick_alerts(warehouse, secret).send("ERROR", "test", "bad url", "still recorded")
    assert record.webhook_status == "failed" and record.webhook_attempts == 1
    ((*_, status, _, error),) = alert_rows(warehouse)
    assert status == "failed" and "not an http(s) URL" in error and "secret" not in error
    from resources import build_resources

    monkeypatch.setenv("ALERT_WEBHOOK_URL", secret)
    with pytest.raises(ValueError, match="ALERT_WEBHOOK_URL is not an http") as refused:
        build_resources(("products",))
    assert "secret" not in str(refused.value)


def test_a_client_error_is_not_retried(warehouse):
    with Webhook(statuses=[404]) as hook:
        record = quick_alerts(warehouse, hook.url).send("INFO", "test", "wrong path", "no retry")
    assert record.webhook_status == "failed" and record.webhook_attempts == 1 and record.webhook_error == "HTTP 404"


def test_secrets_never_reach_the_table_or_the_webhook(warehouse, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-abcdefghijklmnop")
    with Webhook() as hook:
        quick_alerts(warehouse, hook.url).send(
            "ERROR", "model_clients", "call failed", "auth failed with key sk-test-abcdefghijklmnop",
            details={"api_key": "sk-test-abcdefghijklmnop", "status": 401})
    stored = json.dumps(alert_rows(warehouse), default=str) + json.dumps(hook.received)
    assert "sk-test-abcdefghijklmnop" not in stored and "secret-token-123456" not in stored
    assert hook.received[0]["details"] == {"api_key": "***", "status": 401}


def test_unknown_severity_is_refused(warehouse):
    with pytest.raises(ValueError, match="severity"):
        quick_alerts(warehouse, None).send("PANIC", "test", "t", "m")


def test_a_bad_batch_alert_reaches_the_webhook_and_a_dead_webhook_fails_nothing(warehouse, tmp_path):
    """The bad batch's failed error_rate check becomes an alert by the check-failure sensor (the
    run raises none itself); a webhook that is down fails neither the run nor the tick."""
    landing = generate_landing(tmp_path / "landing", customers=150, days=1,
                               faults=FaultRates(malformed_json=0.15), seed=9)
    with dg.instance_for_test() as instance:
        result = dg.materialize([RAW["raw_products"], RAW["raw_customers"]], partition_key=day(0),
                                resources=raw_resources(warehouse, landing), instance=instance)
        assert result.success and not check_results(result)[("raw_customers", "error_rate")].passed
        with Webhook() as hook:
            tick_check_alerts(instance, raw_resources(warehouse, landing, webhook_url=hook.url)["alerts"])
        tick_check_alerts(instance, raw_resources(warehouse, landing, webhook_url=closed_port_url())["alerts"])
    (posted,) = hook.received
    assert posted["severity"] == "ERROR" and posted["details"]["check"] == "error_rate"
    assert posted["details"]["metadata"]["error_rate"] > 0.05
    statuses = [row[5] for row in alert_rows(warehouse)]
    assert statuses == ["delivered", "failed"]


def tick_check_alerts(instance: dg.DagsterInstance, alerts: Alerts) -> None:
    """A tick of a check-failure sensor starting afresh (no cursor)."""
    with dg.build_sensor_context(instance=instance, resources={
            "alerts": alerts, "monitoring": MonitoringSettings()}) as context:
        asset_check_failure_alerts(context)


class SlackReceiver:
    """A local stand-in for the Slack Web API: records chat.postMessage calls, answers `ok` or an error."""

    def __init__(self, error: str | None = None):
        self.calls: list[tuple[str, dict]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.calls.append((self.headers.get("Authorization", ""), json.loads(body)))
                answer = {"ok": error is None, **({"error": error} if error else {"ts": "1.0"})}
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_port}/api/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("error", [None, "channel_not_found"])
def test_alerts_go_to_slack_through_dagster_slack(warehouse, error):
    slack = SlackReceiver(error)
    try:
        alerts = Alerts(warehouse=warehouse, slack_token="xoxb-test-token-123456", slack_channel="#data-alerts",
                        slack_api_url=slack.api_url)
        sent = alerts.send("ERROR", "raw_customers", "schema error rate 12.0% in customers on 2011-09-01",
                           "24 of 200 records quarantined", details={"asset": "raw_customers", "partition": "2011-09-01"})
    finally:
        slack.close()
    ((authorization, body),) = slack.calls
    assert authorization == "Bearer xoxb-test-token-123456" and body["channel"] == "#data-alerts"
    assert "*ERROR* schema error rate 12.0%" in body["text"] and "partition=2011-09-01" in body["text"]
    assert sent.slack_status == ("delivered" if error is None else "failed: channel_not_found")
    with warehouse.connect(read_only=True) as con:
        assert fetch_all(con, "SELECT slack_status FROM ops.alerts") == [(sent.slack_status,)]
    assert "xoxb" not in repr(alerts)
