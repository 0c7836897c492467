"""What starts the daily pipeline: the landing files, and a schedule as the fallback.

`landing_sensor` looks at the last days' landing folders; once every configured source
(`PIPELINE_SOURCES`) has its file for a day (on a closed day: the sources that send one), it
requests a run of `daily_pipeline` for that
partition, keyed by the files' names, sizes and modification times: a file that changes later
triggers the day again (the fingerprints make that run cheap: only what changed is rebuilt), and
the complete days after it (`days_after_a_correction`), whose runs take the change into the later
days' verdicts and the current tables; an unchanged day is never requested twice. Its first tick
only takes stock: the days that had landed before it was turned on are history, which a user
backfills in one run from the UI
(a sensor that woke up to 14 queued runs would surprise, and race that backfill). The schedule
asks for yesterday's partition every morning, for the days the sensor missed (its daemon down,
a file that never came): a run of complete, unchanged inputs is a skip.
"""

import hashlib
import json
import os
from typing import Any

import dagster as dg

from assets.common.partitions import daily_partitions
from assets.common.sources import SOURCES, Source, configured_sources
from resources.landing import LandingZone

LOOKBACK_DAYS = 14  # the days the sensor watches; older days are a backfill matter
# How often the daemon looks at the landing folder (a directory listing: cheap).
INTERVAL_SECONDS = int(os.getenv("LANDING_SENSOR_INTERVAL_SECONDS", "60"))


def day_signature(landing: LandingZone, sources: tuple[Source, ...], day: str) -> str | None:
    """A digest of the day's files (path, size, mtime), or None while one is missing or empty. On a
    closed day (LandingZone.is_closed) no file is awaited: the files that came make it complete
    (the others land as closed), and a closed day without any is left to the schedule."""
    parts, closed = [], landing.is_closed(day)
    for source in sources:
        path = landing.path(source.name, day, source.landing_pattern)
        try:
            stat = path.stat()
        except FileNotFoundError:
            if closed:
                continue
            return None
        except OSError:
            return None
        if stat.st_size == 0:
            return None
        parts.append((str(path), stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16] if parts else None


def took_stock(complete: dict[str, str]) -> str:
    if not complete:
        return "first tick: no complete day landed yet; each day is run once all its files are in"
    return (f"first tick: {len(complete)} complete day(s) already landed ({min(complete)}..{max(complete)}) are "
            "history: backfill them from the UI (Materialize all -> partitions). New or changed days from now on "
            "are run by this sensor.")


def watched_days(partitions_def: dg.TimeWindowPartitionsDefinition, lookback: int) -> list[str]:
    return partitions_def.get_partition_keys()[-lookback:]


def build_landing_sensor(job: Any, sources: tuple[Source, ...] = SOURCES,
                         partitions_def: dg.TimeWindowPartitionsDefinition = daily_partitions) -> dg.SensorDefinition:
    watched_sources = configured_sources(sources)

    @dg.sensor(
        name="landing_sensor",
        job=job,
        minimum_interval_seconds=INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Runs daily_pipeline for a day once every configured source's file has landed "
                    "(and again when one of them changes).",
    )
    def landing_sensor(context: dg.SensorEvaluationContext, landing: LandingZone) -> dg.SensorResult:
        days = watched_days(partitions_def, LOOKBACK_DAYS)
        signatures = {day: day_signature(landing, watched_sources, day) for day in days}
        complete = {day: signature for day, signature in signatures.items() if signature is not None}
        if context.cursor is None:  # first tick: what already landed is history, for a backfill
            return dg.SensorResult(cursor=json.dumps(complete), skip_reason=took_stock(complete))
        seen = json.loads(context.cursor)
        requests = [dg.RunRequest(run_key=f"{day}:{signature}", partition_key=day, tags={"trigger": "landing"})
                    for day, signature in complete.items() if seen.get(day) != signature]
        closed = [day for day, signature in signatures.items() if signature is None and landing.is_closed(day)]
        requests += days_after_a_correction(complete, seen, requests, judged_against_a_catalog(watched_sources),
                                            closed)
        requests.sort(key=lambda request: request.partition_key)  # runs go one at a time, in the order asked
        kept = {day: complete.get(day) or seen[day] for day in days if day in complete or day in seen}
        waiting = [day for day, signature in signatures.items() if signature is None]
        skip = None if requests else f"no new or changed complete day; incomplete: {waiting[-3:] or 'none'}"
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(kept), skip_reason=skip)

    return landing_sensor


def judged_against_a_catalog(sources: tuple[Source, ...]) -> bool:
    """Whether a source's records are judged against another's batches up to their day (customers'
    purchases against the products catalog): then a corrected day changes the later days too."""
    return any(catalog.asset in source.deps for catalog in sources for source in sources)


def days_after_a_correction(complete: dict[str, str], seen: dict[str, str], requests: list[dg.RunRequest],
                            catalog_judged: bool, closed: list[str] = ()) -> list[dg.RunRequest]:
    """A file of an earlier day written again (a correction), or come late, lands in that day's
    run; the days after it are asked again after it (runs go one at a time, in the order asked):
    - the latest day (complete, or closed without a file: the schedule runs those too), whose run
      takes the change into the current tables where the corrected day's run did not (on the
      lakehouse, whose stages build as of the run's day; the warehouse's catch up already);
    - where records are judged against a catalog up to their day, every day after the corrected
      one: its records were judged against the old catalog (a product added or taken back), and
      its run lands them again (the catalog is in its fingerprint). Before, the days between kept
      their old verdicts, all green (found by an outside-in probe), as did a late day and a
      correction before a closed day."""
    # A day completed late (its file came after a later day's run) is a correction too.
    changed = [day for day, signature in complete.items()
               if (seen[day] != signature if day in seen else bool(seen) and day < max(seen))]
    if not changed:
        return []
    asked = {request.partition_key for request in requests}
    days = sorted({*complete, *closed})
    later = [day for day in days if day > min(changed)] if catalog_judged else [days[-1]]
    corrections = ",".join(f"{day}:{complete[day]}" for day in changed)
    return [dg.RunRequest(run_key=f"{day}:{complete.get(day, 'closed')}:after:{corrections}", partition_key=day,
                          tags={"trigger": "landing", "after_changed_days": ",".join(changed)})
            for day in later if day not in asked]


# When the fallback asks for the last complete day (cron, UTC); tests run it every minute.
SCHEDULE_CRON = os.getenv("DAILY_SCHEDULE_CRON", "0 6 * * *")
# A day the schedule asked for is asked again only when that run ended failed or canceled.
NOT_FAILED = [status for status in dg.DagsterRunStatus
              if status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)]


def build_daily_schedule(job: Any, partitions_def: dg.TimeWindowPartitionsDefinition = daily_partitions
                         ) -> dg.ScheduleDefinition:
    """Every morning at 06:00 UTC, the last complete day (yesterday, or the partitions' last day):
    the fallback of the landing sensor. An unchanged day is a skip run, a day whose file never
    came fails with the path (and its incident). Asked once per day unless that run failed:
    Dagster's run key dedupes only within one tick, and partitions that end on a set day, or
    ticks caught up after the daemon was down, name the same day again."""

    @dg.schedule(
        name="daily_pipeline_schedule", job=job, cron_schedule=SCHEDULE_CRON, execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Daily fallback: yesterday's partition, for the days the landing sensor missed.",
    )
    def daily_pipeline_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        days = partitions_def.get_partition_keys(current_time=context.scheduled_execution_time)
        if not days:
            return dg.SkipReason("no complete day yet")
        day = days[-1]
        asked = context.instance.get_run_records(dg.RunsFilter(
            job_name=job.name, tags={"trigger": "schedule", "dagster/partition": day}, statuses=NOT_FAILED), limit=1)
        if asked:  # a failed or canceled ask is asked again: the fallback goes on until the day is built
            return dg.SkipReason(f"{day} was asked for already (run {asked[0].dagster_run.run_id}, "
                                 f"{asked[0].dagster_run.status.value})")
        return dg.RunRequest(run_key=f"schedule:{day}", partition_key=day, tags={"trigger": "schedule"})

    return daily_pipeline_schedule
