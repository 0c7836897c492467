"""Real parts for the sensor tests: a Dagster instance, runs that report metadata, a webhook server."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg

from assets.common.partitions import daily_partitions

# The instance's SQLite shards fsync on every run; a tmpfs keeps a test's dozens of runs quick.
FAST_TMP = "/dev/shm" if Path("/dev/shm").is_dir() else None


@contextmanager
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """A real, persistent instance (the SQLite storage `dagster dev` uses) in a temp dir."""
    with tempfile.TemporaryDirectory(dir=FAST_TMP) as home, dg.instance_for_test(temp_dir=home) as instance:
        yield instance


def emit(instance: dg.DagsterInstance, name: str, metadata: dict, partition: str | None = None) -> None:
    """A real run of a one-off asset that reports the given materialization metadata."""

    @dg.asset(name=name, partitions_def=daily_partitions if partition else None)
    def reporting_asset() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata=metadata)

    assert dg.materialize([reporting_asset], instance=instance, partition_key=partition).success


class WebhookServer:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it and answers `status`."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.received.append(json.loads(body))
                self.send_response(server.status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/hooks/alerts"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
