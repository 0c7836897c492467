"""Every monitoring threshold, in one place.

The sensors read these from the `monitoring` resource, so a deployment changes a threshold by
configuring that resource (see `sensors/__init__.py`), never by editing a sensor.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from assets.common.sources import SOURCES, Source, ingestion_assets

INGESTION_ASSETS = ingestion_assets()
EVERY_ASSET = "*"

METRIC_RULE_ASSETS = {
    "row_count_anomaly": [EVERY_ASSET],
    "schema_error_rate": INGESTION_ASSETS,
    "dlq_growth": ["product_embeddings", "recommendations"],
    "model_latency": ["product_embeddings"],
    "confidence_drop": ["recommendations"],
    "confidence_drift": ["recommendations"],
    "segment_drift": ["customer_segments"],
    "rejection_rate": ["validated_recommendations"],
}


class MonitoringSettings(dg.ConfigurableResource):
    """Thresholds and watch lists of the alerting sensors."""

    # Partition-aware freshness
    freshness_assets: list[str] = Field(
        default=INGESTION_ASSETS, description="Daily-partitioned assets whose every day must land."
    )
    freshness_lag_hours: float = Field(
        default=6.0, description="Hours after a day ends (in the partitions' timezone) before its partition is late."
    )
    freshness_lookback_days: int = Field(
        default=7, description="Only days this recent are watched (older gaps are a backfill matter, not an alert)."
    )

    # Which assets each metric rule watches ("*" = every asset the instance has seen)
    rule_assets: dict[str, list[str]] = Field(
        default=METRIC_RULE_ASSETS, description="Metric rule name -> assets it watches."
    )
    history_size: int = Field(default=7, description="Earlier materializations (one per run) a baseline is taken over.")

    # Row counts against the same asset's trailing median
    row_count_min_history: int = Field(default=3, description="Fewer earlier materializations than this: no verdict.")
    row_count_factor: float = Field(
        default=3.0, description="Alert when `dagster/row_count` is above median x factor or below median / factor."
    )

    # Per-materialization quality metrics
    max_error_rate: float = Field(default=0.05, description="Schema error rate (`error_rate`) above which raw_* alert.")
    max_dlq_count: int = Field(default=100, description="`dlq_count` above which a model stage alerts.")
    alert_on_dlq_growth: bool = Field(default=True, description="Alert when `dlq_count` grows vs the previous run.")
    max_latency_p95_ms: float = Field(default=2_000.0, description="`latency_p95_ms` above which model calls alert.")
    max_latency_p99_ms: float = Field(default=5_000.0, description="`latency_p99_ms` above which model calls alert.")
    max_confidence_mean_drop: float = Field(
        default=0.1, description="Alert when `confidence_mean` falls this much (absolute) below its trailing median."
    )
    max_psi: float = Field(default=0.2, description="Population Stability Index above which an output has drifted.")
    max_rejection_rate: float = Field(default=0.2, description="`rejection_rate` above which output rules alert.")

    # Sensor work per tick
    events_per_tick: int = Field(default=500, description="Event-log records one tick reads, at most.")
    alert_row_lock_timeout_seconds: float = Field(
        default=2.0, description="How long a sensor waits for the warehouse lock to write an `ops.alerts` row."
    )
    tick_budget_seconds: float = Field(
        default=30.0, description="Delivery stops starting new alerts after this long (sensor ticks time out at 60 s)."
    )


def settings_for(sources: tuple[Source, ...] = SOURCES) -> MonitoringSettings:
    """The default settings, watching the ingestion assets of these sources."""
    watched = ingestion_assets(sources)
    return MonitoringSettings(freshness_assets=watched,
                              rule_assets={**METRIC_RULE_ASSETS, "schema_error_rate": watched})
