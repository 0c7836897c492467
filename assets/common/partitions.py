"""One partition a day: each daily landing batch is one partition of every batch asset.

The partitions fit the data, not the calendar since 2010: the first day comes from
`PIPELINE_FIRST_DAY` (default: the generator's first day, 2011-09-01; the Online Retail history
starts on 2010-12-01), the last from `PIPELINE_LAST_DAY` when the data is historical: a day, or
`landing` for the last day a source has a landing file for (the demo and `tasks.py ui` use
that). Otherwise the last partition is the last complete day: a day's partition appears once
the day is over.
"""

import datetime as dt
import os

import dagster as dg

from assets.common.sources import SOURCES, Source
from resources import landing_zone
from resources.landing import LandingZone

DEFAULT_FIRST_DAY = "2011-09-01"  # generator.GeneratorConfig.start


def last_landed_day(zone: LandingZone, sources: tuple[Source, ...] = SOURCES) -> str | None:
    """The latest day a source has a file for where ingestion reads it (None if none): the
    landing zone's own patterns, `LANDING_<SOURCE>_PATTERN` included, and only real days."""
    days = [day for source in sources for day in zone.days_available(source.name, None, source.landing_pattern)[-1:]]
    return max(days) if days else None


def last_day(setting: str | None) -> str | None:
    if setting == "landing":
        return last_landed_day(landing_zone(tuple(source.name for source in SOURCES)))
    return setting or None


def exclusive_end(day: str | None) -> str | None:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat() if day else None


FIRST_DAY = os.getenv("PIPELINE_FIRST_DAY") or DEFAULT_FIRST_DAY
LAST_DAY = last_day(os.getenv("PIPELINE_LAST_DAY"))
daily_partitions = dg.DailyPartitionsDefinition(start_date=FIRST_DAY, end_date=exclusive_end(LAST_DAY))


def first_partition(context: dg.AssetExecutionContext) -> str:
    """The first day of the step's asset's partitions: landing files of earlier days never land."""
    return context.assets_def.partitions_def.get_first_partition_key()
