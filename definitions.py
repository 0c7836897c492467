"""The code location: every asset, check, sensor and resource, put together once."""

import dagster as dg

from assets import embeddings, evaluation, ingestion, outputs, recommendations, segments, sql_models, validation
from assets.partitions import daily_partitions
from resources import build_resources
import sensors

# Every stage for one day, from landing files to validated recommendations and their checks.
daily_pipeline = dg.define_asset_job(
    "daily_pipeline",
    selection=dg.AssetSelection.all(),
    partitions_def=daily_partitions,
    description="One daily batch end to end: ingestion, validation, SQL models, AI stages, output rules, checks.",
)

defs = dg.Definitions.merge(
    ingestion.defs,
    validation.defs,
    sensors.defs,
    sql_models.defs,
    dg.Definitions(assets=[embeddings.product_embeddings]),
    segments.defs,
    recommendations.defs,
    evaluation.defs,
    outputs.defs,
    dg.Definitions(resources=build_resources(), jobs=[daily_pipeline]),
)
