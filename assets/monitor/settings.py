"""Every monitoring threshold, in one place.

The sensors read these from the `monitoring` resource, so a deployment changes a threshold by
configuring that resource (see `sensors/__init__.py`), never by editing a sensor.
"""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from assets.common.sources import SOURCES, Source, configured_sources, ingestion_assets

INGESTION_ASSETS = ingestion_assets(configured_sources())
EVERY_ASSET = "*"

METRIC_RULE_ASSETS = {
    "row_count_anomaly": [EVERY_ASSET],
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
    expected_weekdays: list[int] = Field(
        default=[0, 1, 2, 3, 4, 5, 6],
        description="Days of the week a batch is expected (0 = Monday); by default every day but "
                    "LANDING_CLOSED_WEEKDAYS (Online Retail, for one, has no Saturdays).")
    holidays: list[str] = Field(default=[], description="Days (YYYY-MM-DD) no batch is expected (LANDING_CLOSED_DAYS).")

    # Which assets each metric rule watches ("*" = every asset the instance has seen)
    rule_assets: dict[str, list[str]] = Field(
        default=METRIC_RULE_ASSETS, description="Metric rule name -> assets it watches."
    )
    history_size: int = Field(default=7, description="Earlier materializations (one per run) a baseline is taken over.")

    # Row counts against the same asset's trailing median
    row_count_min_history: int = Field(default=3, description="Fewer earlier materializations than this: no verdict.")
    row_count_max_change: float = Field(
        default=0.3, description="Alert when `dagster/row_count` is more than this share off the trailing median.")
    row_count_weekday_history: int = Field(
        default=4, description="With this many earlier builds of the same weekday, the robust z-score decides.")
    row_count_max_z: float = Field(
        default=3.5, description="Robust z-score (median, MAD) over the same weekday above which a count is an anomaly.")

    # Per-materialization quality metrics
    max_dlq_count: int = Field(default=100, description="`dlq_count` above which a model stage alerts.")
    alert_on_dlq_growth: bool = Field(default=True, description="Alert when `dlq_count` grows vs the previous run.")
    max_latency_p95_ms: float = Field(default=2_000.0, description="`latency_p95_ms` above which model calls alert.")
    max_latency_p99_ms: float = Field(default=5_000.0, description="`latency_p99_ms` above which model calls alert.")
    latency_min_requests: int = Field(default=20, description="Fewer requests than this: latency is not judged.")
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
    """The default settings, watching the ingestion assets of the configured sources; with
    PIPELINE_BACKEND=lakehouse, the lakehouse's assets of the same stages (lake_<asset>: the
    daily triggers run those, with the same metadata)."""
    from resources import landing_zone, pipeline_backend

    watched = ingestion_assets(configured_sources(sources))
    closed = landing_zone(())  # the shop's closed days (LANDING_CLOSED_*): no batch is expected then
    calendar = {"expected_weekdays": [d for d in range(7) if d not in closed.closed_weekdays],
                "holidays": closed.closed_days}
    if pipeline_backend() != "lakehouse":
        return MonitoringSettings(freshness_assets=watched, **calendar)

    def on_lake(asset: str) -> str:
        return asset if asset == EVERY_ASSET else f"lake_{asset}"

    return MonitoringSettings(freshness_assets=[on_lake(a) for a in watched], **calendar,
                              rule_assets={rule: [on_lake(a) for a in assets] for rule, assets in METRIC_RULE_ASSETS.items()})
