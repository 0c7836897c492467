"""One partition a day: each daily landing batch is one partition of every batch asset.

The partitions fit the data, not the calendar since 2010: the first day comes from
`PIPELINE_FIRST_DAY` (default: the generator's first day, 2011-09-01; the Online Retail history
starts on 2010-12-01), the last from `PIPELINE_LAST_DAY` when the data is historical: a day, or
`landing` for the last day a file under `LANDING_DIR` is named after (the demo and `tasks.py ui`
use that). Otherwise the last partition is the last complete day: a day's partition appears once
the day is over.
"""

import datetime as dt
import glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

import dagster as dg

DEFAULT_FIRST_DAY = "2011-09-01"  # generator.GeneratorConfig.start
DAY_FILE = re.compile(r"(\d{4}-\d{2}-\d{2})\.[A-Za-z.]+$")


def last_landed_day(landing_dir: str | Path, patterns: Iterable[str] = ()) -> str | None:
    """The latest YYYY-MM-DD a landing file is named after (None if none): under the folder, or
    where a source's own pattern points (`LANDING_<SOURCE>_PATTERN`, relative to the folder or
    absolute, as the landing zone reads it)."""
    paths = list(Path(landing_dir).glob("*/*"))
    for pattern in patterns:
        paths += [Path(p) for p in glob.glob(str(Path(landing_dir) / pattern.replace("{date}", "*")))]
    days = [m.group(1) for path in paths if (m := DAY_FILE.search(path.name))]
    return max(days) if days else None


def last_day(setting: str | None) -> str | None:
    if setting == "landing":
        patterns = [value for name, value in os.environ.items()
                    if name.startswith("LANDING_") and name.endswith("_PATTERN") and value]
        return last_landed_day(os.getenv("LANDING_DIR", "data/landing"), patterns)
    return setting or None


def exclusive_end(day: str | None) -> str | None:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=1)).isoformat() if day else None


FIRST_DAY = os.getenv("PIPELINE_FIRST_DAY") or DEFAULT_FIRST_DAY
LAST_DAY = last_day(os.getenv("PIPELINE_LAST_DAY"))
daily_partitions = dg.DailyPartitionsDefinition(start_date=FIRST_DAY, end_date=exclusive_end(LAST_DAY))


def first_partition(context: dg.AssetExecutionContext) -> str:
    """The first day of the step's asset's partitions: landing files of earlier days never land."""
    return context.assets_def.partitions_def.get_first_partition_key()
