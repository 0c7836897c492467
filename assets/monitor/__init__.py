"""Monitor: sensors that read the Dagster event log (never the DuckDB file) and raise alerts.

All start stopped; turn them on in the UI (Automation -> Sensors) with the daemon running
(`dagster dev` runs one). Thresholds live in `MonitoringSettings` (assets/monitor/settings.py),
whose watch lists derive from the source registry; alerts go out through the `alerts` resource
(log, `ops.alerts`, optional webhook).
"""

from pathlib import Path

import dagster as dg

from assets.common.catalog import code_references
from assets.monitor import delivery

from assets.common.sources import SOURCES, Source
from assets.monitor.check_alerts import asset_check_failure_alerts
from assets.monitor.delivery import INCIDENTS_ASSET
from assets.monitor.freshness import partition_freshness_alerts
from assets.monitor.metrics import metric_anomaly_alerts
from assets.monitor.run_failures import run_failure_alerts
from assets.monitor.settings import MonitoringSettings, settings_for


# Every alert the sensors send is an observation of this asset: one place in the UI to look.
INCIDENTS = dg.AssetSpec(
    INCIDENTS_ASSET, group_name="monitor", kinds={"alerts"},
    metadata={"dagster/table_name": "ops.alerts", **code_references(Path(delivery.__file__))},
    description="Incidents raised and resolved by the alerting sensors (asset, partition, cause, severity); "
                "each open or resolve notice is an observation with its details.",
)


def build_monitor_defs(sources: tuple[Source, ...] = SOURCES) -> dg.Definitions:
    return dg.Definitions(
        sensors=[asset_check_failure_alerts, run_failure_alerts, partition_freshness_alerts, metric_anomaly_alerts],
        resources={"monitoring": settings_for(sources)},
    )


defs = build_monitor_defs()

__all__ = ["INCIDENTS", "MonitoringSettings", "build_monitor_defs", "defs"]
