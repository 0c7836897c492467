"""The landing zone: where each day's source files are, and whether they can be read.

Paths come from a pattern per source, relative to `root` unless absolute, with `{date}` standing
for the partition day (YYYY-MM-DD). The caller (ingestion, from the source registry) gives each
source's default pattern; `patterns` overrides it per source, so transactions can point at the
Online Retail download (`/data/online-retail/by-day/{date}.csv`) while products and customers come
from the generator.
"""

from __future__ import annotations

import codecs
import datetime as dt
import glob
import os
import re
from pathlib import Path

import dagster as dg
from pydantic import Field

DEFAULT_LANDING_DIR = "data/landing"


class LandingFileError(Exception):
    """A source file that cannot be ingested: says which file and why."""

    def __init__(self, source: str, path: Path, cause: str):
        super().__init__(f"{source} file {path}: {cause}")
        self.source, self.path, self.cause = source, path, cause


class LandingZone(dg.ConfigurableResource):
    """Local folders of daily landing files, one pattern per source."""

    root: str = Field(default=DEFAULT_LANDING_DIR, description="Folder the relative patterns start from.")
    patterns: dict[str, str] = Field(
        default_factory=dict, description="Source name -> path pattern ({date} = YYYY-MM-DD), overriding its default.")
    closed_weekdays: list[int] = Field(
        default_factory=list, description="Days of the week no file comes (0 = Monday; Online Retail: [5]): such a "
                                          "day without a file lands as a closed day, with no records, not as missing.")
    closed_days: list[str] = Field(default_factory=list, description="Days (YYYY-MM-DD) no file comes (holidays).")
    timestamp_formats: dict[str, str] = Field(
        default_factory=dict, description="Source name -> the strftime format its files write timestamps in "
                                          "(e.g. %m/%d/%Y %H:%M), when it is not ISO 8601.")
    encodings: dict[str, str] = Field(
        default_factory=dict, description="Source name -> the single-byte text encoding its files are written in "
                                          "(e.g. latin-1, cp1252), when it is not UTF-8; read as UTF-8 after.")

    def is_closed(self, partition_date: str | dt.date) -> bool:
        """A day the shop sends no file: its weekday or the day itself is configured closed."""
        day = partition_date if isinstance(partition_date, dt.date) else dt.date.fromisoformat(partition_date)
        return day.weekday() in self.closed_weekdays or day.isoformat() in self.closed_days

    def path(self, source: str, partition_date: str | dt.date, default_pattern: str) -> Path:
        """Where the source's file for the day should be (it may not exist)."""
        day = partition_date if isinstance(partition_date, str) else partition_date.isoformat()
        pattern = self.patterns.get(source, default_pattern)
        return Path(self.root) / pattern.format(date=day)

    def days_available(self, source: str, until: str | dt.date | None, default_pattern: str,
                       since: str | dt.date | None = None) -> list[str]:
        """The days (YYYY-MM-DD) that have a file for the source, from `since` up to `until` included."""
        pattern = str(self.path(source, "{date}", default_pattern))
        shape = re.compile(re.escape(pattern).replace(re.escape("{date}"), r"(\d{4}-\d{2}-\d{2})"))
        days = set()
        for candidate in glob.glob(glob.escape(pattern).replace(glob.escape("{date}"), "*")):
            match = shape.fullmatch(candidate)
            if match and is_iso_day(match.group(1)) and (until is None or match.group(1) <= str(until)) \
                    and (since is None or match.group(1) >= str(since)):
                days.add(match.group(1))
        return sorted(days)

    def require(self, source: str, partition_date: str | dt.date, default_pattern: str) -> Path:
        """The path of a file that exists, is not empty and can be read; LandingFileError otherwise."""
        path = self.path(source, partition_date, default_pattern)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise LandingFileError(source, path, "missing (no such file)") from None
        except OSError as error:
            raise LandingFileError(source, path, f"unreadable ({error.strerror or error})") from None
        if not path.is_file():
            raise LandingFileError(source, path, "not a regular file")
        if size == 0:
            raise LandingFileError(source, path, "empty (0 bytes)")
        if not os.access(path, os.R_OK):
            raise LandingFileError(source, path, "unreadable (permission denied)")
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as error:
            raise LandingFileError(source, path, f"unreadable ({error.strerror or error})") from None
        return path


STRFTIME_FORMAT = re.compile(r"[%A-Za-z0-9 /:.,_\-]+")


def checked_strftime_format(text: str) -> str:
    """A strftime format safe to write into SQL (it comes from configuration, not from data):
    directives, letters, digits and the separators dates use, with at least one directive."""
    if not STRFTIME_FORMAT.fullmatch(text) or "%" not in text:
        raise ValueError(f"timestamp format {text!r} is not a strftime format such as %m/%d/%Y %H:%M")
    return text


ASCII = bytes(range(128))


def checked_encoding(name: str) -> str | None:
    """A file encoding this ingestion can read: UTF-8 (None, the default) or a single-byte codec
    that keeps ASCII (latin-1, cp1252, iso-8859-15...), whose lines end where the file's bytes say
    (byte ranges of shards stay whole lines). Its canonical name; a ValueError names a wrong one."""
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise ValueError(f"encoding {name!r} is not a known text encoding (e.g. latin-1, cp1252)") from None
    if codec == "utf-8":
        return None
    single_byte = len(bytes(range(256)).decode(codec, "replace")) == 256
    if not single_byte or ASCII.decode(codec, "replace") != ASCII.decode("ascii"):
        raise ValueError(f"encoding {name!r} is not a single-byte encoding that keeps ASCII (e.g. latin-1, cp1252): "
                         "convert the files to UTF-8")
    return codec


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def parse_weekdays(text: str) -> list[int]:
    """'Sat,Sun' (names or their first three letters, any case) or '5,6' -> [5, 6]."""
    days = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        if part.isdigit() and int(part) < 7:
            days.append(int(part))
        elif names := [i for i, name in enumerate(WEEKDAYS) if part in (name, name[:3])]:
            days.append(names[0])
        else:
            raise ValueError(f"{part!r} is not a day of the week: use Mon..Sun or 0..6 (0 = Monday)")
    return sorted(set(days))


def parse_days(text: str) -> list[str]:
    """'2011-12-25,2011-12-26' -> the days, each checked to be a real YYYY-MM-DD day."""
    days = [p.strip() for p in text.split(",") if p.strip()]
    wrong = [d for d in days if not is_iso_day(d)]
    if wrong:
        raise ValueError(f"{wrong} are not days written YYYY-MM-DD")
    return sorted(set(days))


def is_iso_day(text: str) -> bool:
    """A real day written YYYY-MM-DD (not 2011-13-45, not 2011-9-1)."""
    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False
