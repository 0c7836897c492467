"""What starts the daily pipeline: the landing files, and a schedule as the fallback.

`landing_sensor` looks at the last days' landing folders; once every configured source
(`PIPELINE_SOURCES`) has its file for a day, it requests a run of `daily_pipeline` for that
partition, keyed by the files' names, sizes and modification times: a file that changes later
triggers the day again (the fingerprints make that run cheap: only what changed is rebuilt),
and an unchanged day is never requested twice. The schedule asks for yesterday's partition
every morning, for the days the sensor missed (its daemon down, a file that never came): a run
of complete, unchanged inputs is a skip.
"""

import hashlib
import json
from typing import Any

import dagster as dg

from assets.common.partitions import daily_partitions
from assets.common.sources import SOURCES, Source, configured_sources
from resources.landing import LandingZone

LOOKBACK_DAYS = 14  # the days the sensor watches; older days are a backfill matter


def day_signature(landing: LandingZone, sources: tuple[Source, ...], day: str) -> str | None:
    """A digest of the day's files (path, size, mtime), or None while one is missing or empty."""
    parts = []
    for source in sources:
        path = landing.path(source.name, day, source.landing_pattern)
        try:
            stat = path.stat()
        except OSError:
            return None
        if stat.st_size == 0:
            return None
        parts.append((str(path), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def watched_days(partitions_def: dg.TimeWindowPartitionsDefinition, lookback: int) -> list[str]:
    return partitions_def.get_partition_keys()[-lookback:]


def build_landing_sensor(job: Any, sources: tuple[Source, ...] = SOURCES,
                         partitions_def: dg.TimeWindowPartitionsDefinition = daily_partitions) -> dg.SensorDefinition:
    watched_sources = configured_sources(sources)

    @dg.sensor(
        name="landing_sensor",
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Runs daily_pipeline for a day once every configured source's file has landed "
                    "(and again when one of them changes).",
    )
    def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingZone) -> dg.SensorResult:
        seen = json.loads(context.cursor) if context.cursor else {}
        requests, waiting = [], []
        days = watched_days(partitions_def, LOOKBACK_DAYS)
        for day in days:
            signature = day_signature(landing, watched_sources, day)
            if signature is None:
                waiting.append(day)
            elif seen.get(day) != signature:
                requests.append(dg.RunRequest(run_key=f"{day}:{signature}", partition_key=day,
                                              tags={"trigger": "landing"}))
                seen[day] = signature
        kept = {day: seen[day] for day in days if day in seen}
        skip = None if requests else f"no new or changed complete day; incomplete: {waiting[-3:] or 'none'}"
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(kept), skip_reason=skip)

    return landing_sensor


def build_daily_schedule(job: Any) -> dg.ScheduleDefinition:
    """Every morning at 06:00, yesterday's partition (the fallback of the landing sensor)."""
    return dg.build_schedule_from_partitioned_job(
        job, name="daily_pipeline_schedule", hour_of_day=6, default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Daily fallback: yesterday's partition, for the days the landing sensor missed.",
    )
