"""The code location: every asset, check, sensor and resource, put together once."""

import dagster as dg

from resources import build_resources

defs = dg.Definitions.merge(
    dg.Definitions(resources=build_resources()),
)
