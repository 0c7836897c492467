"""A step must not hold the warehouse lock while it works: an alert row is written meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from resources.alerts import Alerts
from resources.warehouse import DuckDBWarehouse, fetch_scalar


class Pause:
    """Holds a step in the middle of its work (in a wrapped function) until released."""

    def __init__(self) -> None:
        self.reached, self.released = threading.Event(), threading.Event()

    def before(self, original: Callable) -> Callable:
        def paused(*args: Any, **kwargs: Any) -> Any:
            self.reached.set()
            self.released.wait(timeout=120)
            return original(*args, **kwargs)
        return paused


def alert_written_while(warehouse: DuckDBWarehouse, run: Callable[[], Any], pause: Pause, doing: str) -> Any:
    """Runs `run` in a thread; once it reaches the pause, writes an alert row waiting at most 5 s
    for the warehouse lock, then releases it. Returns run's result."""
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(run()))
    worker.start()
    try:
        assert pause.reached.wait(timeout=120), f"never started {doing}"
        alerts = Alerts(warehouse=warehouse)
        alert = alerts.notify("WARN", "test", f"written while {doing}", "a row", log=None)
        alerts.record(alert, lock_timeout_seconds=5.0)  # WarehouseLockTimeout if the step holds the lock
        assert worker.is_alive(), f"done before the alert was written ({doing}): the test proves nothing"
    finally:
        pause.released.set()
        worker.join(timeout=300)
    with warehouse.connect(read_only=True) as con:
        assert fetch_scalar(con, "SELECT count(*) FROM ops.alerts WHERE alert_id = ?", [alert.alert_id]) == 1
    assert outcome, f"{doing}: the run did not return"
    return outcome[0]
