"""Alerting sensors: they read the Dagster event log (never the DuckDB file) and raise alerts.

All start stopped; turn them on in the UI (Automation -> Sensors) with the daemon running
(`dagster dev` runs one). Thresholds live in `MonitoringSettings` (sensors/settings.py), set once
here; alerts go out through the `alerts` resource (log, `ops.alerts`, optional webhook).
"""

import dagster as dg

from sensors.check_alerts import asset_check_failure_alerts
from sensors.freshness import partition_freshness_alerts
from sensors.metrics import metric_anomaly_alerts
from sensors.run_failures import run_failure_alerts
from sensors.settings import MonitoringSettings

defs = dg.Definitions(
    sensors=[asset_check_failure_alerts, run_failure_alerts, partition_freshness_alerts, metric_anomaly_alerts],
    resources={"monitoring": MonitoringSettings()},
)
