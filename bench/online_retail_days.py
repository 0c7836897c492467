"""Split a download of UCI Online Retail into one CSV per day: the files the pipeline lands
(`LANDING_TRANSACTIONS_PATTERN=<out>/{date}.csv`) and the benchmarks and tests read.

    python3 tasks.py online-retail ~/Downloads/online+retail.zip --out data/online-retail/by-day

Sources:
- UCI's download of dataset 352: `online+retail.zip`, or the `Online Retail.xlsx` inside it;
- a CSV with the same columns, for example Kaggle's `data.csv`, which is Latin-1 with US dates
  (`12/1/2010 8:26`): add `--encoding latin-1 --timestamp-format '%m/%d/%Y %H:%M'`.

Each day's file is UTF-8 with the header `InvoiceNo,StockCode,...,Country`, its lines in the
source's order, and every value written the one way the copy in databricks/Spark-The-Definitive-Guide
writes it (`2010-12-01 08:26:00`, `2.55`, `17850.0`): the same lines give the same bytes from any
source. Values are not judged here: one that is not a number stays as the source wrote it, and
the pipeline quarantines its line with the reason. Only a line whose date cannot be read stops
the split, naming the line: no day's file could hold it, and leaving it out would lose it.

Days after `--last-day` (2011-08-31 unless set) are counted, not written: the later months are
this project's independent quality check, never read in development. `--last-day 2011-12-09`
writes them all.

The split ends by printing the landing calendar its days imply: the weekdays that never have a
file (`LANDING_CLOSED_WEEKDAYS`) and the other days without one (`LANDING_CLOSED_DAYS`).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

COLUMNS = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country"]
ISO_SECONDS = "%Y-%m-%d %H:%M:%S"
DEVELOPMENT_LAST_DAY = date(2011, 8, 31)
WEEKDAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


class SplitError(ValueError):
    """The source cannot be split as it is; the message says where and why."""


def _cell(column: str, value: object) -> str:
    """One value as the Spark copy writes it. Excel keeps numbers as numbers: codes and quantities
    as integers (`536365`, `22423`, `6`), prices and customer ids as doubles (`2.55`, `17850.0`).
    A CSV's text stays as it is, but for a customer id written as an integer (Kaggle's `17850`)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value + ".0" if column == "CustomerID" and value.isdigit() else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if column in ("UnitPrice", "CustomerID"):
            return repr(float(value))
        return str(int(value)) if float(value).is_integer() else repr(value)
    return str(value)


def _timestamp(value: object, timestamp_format: str) -> datetime | None:
    """Excel's datetimes come as floats of days, off by microseconds: rounded to the second."""
    if isinstance(value, datetime):
        return (value + timedelta(microseconds=500_000)).replace(microsecond=0)
    try:
        return datetime.strptime(str(value).strip(), timestamp_format)
    except ValueError:
        return None


def xlsx_rows(source: Path) -> Iterator[tuple]:
    """The first sheet of an .xlsx, or of the one .xlsx inside a .zip."""
    from openpyxl import load_workbook  # noqa: PLC0415 (only this step reads Excel)

    if source.suffix.lower() == ".zip":
        with zipfile.ZipFile(source) as archive:
            members = [name for name in archive.namelist() if name.lower().endswith(".xlsx")]
            if len(members) != 1:
                raise SplitError(f"{source}: expected one .xlsx inside, found {members or 'none'}")
            workbook = load_workbook(io.BytesIO(archive.read(members[0])), read_only=True, data_only=True)
    else:
        workbook = load_workbook(source, read_only=True, data_only=True)
    sheet = workbook.worksheets[0]
    sheet.reset_dimensions()  # read every row, not the range the file declares (some writers declare A1:A1)
    try:
        yield from sheet.iter_rows(values_only=True)
    finally:
        workbook.close()


def csv_rows(source: Path, encoding: str) -> Iterator[list[str]]:
    with source.open(newline="", encoding=encoding) as handle:
        yield from csv.reader(handle)


def split_days(rows, where: str, timestamp_format: str, last_day: date) -> tuple[dict[date, list[list[str]]], dict]:
    """The source's lines by day, formatted; and counts of what was read and left out."""
    header = [("" if name is None else str(name)).strip().lstrip("\ufeff") for name in next(rows, [])]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise SplitError(f"{where}: no column {', '.join(missing)} in the header {header}")
    places = [header.index(name) for name in COLUMNS]
    at_date = COLUMNS.index("InvoiceDate")
    days: dict[date, list[list[str]]] = defaultdict(list)
    counts = {"lines": 0, "lines_after_last_day": 0}
    later_days: set[date] = set()
    unplaced: list[str] = []
    for number, row in enumerate(rows, start=2):
        if not any(cell not in (None, "") for cell in row):
            continue  # a blank line or an empty spreadsheet row is no record
        values = [row[place] if place < len(row) else None for place in places]
        stamp = _timestamp(values[at_date], timestamp_format)
        if stamp is None:
            unplaced.append(f"row {number}: InvoiceDate {values[at_date]!r}")
            continue
        counts["lines"] += 1
        if stamp.date() > last_day:
            counts["lines_after_last_day"] += 1
            later_days.add(stamp.date())
            continue
        values[at_date] = stamp.strftime(ISO_SECONDS)
        days[stamp.date()].append([_cell(name, value) for name, value in zip(COLUMNS, values)])
    if unplaced:
        raise SplitError(f"{where}: {len(unplaced)} row(s) whose InvoiceDate is not '{timestamp_format}' "
                         f"(set --timestamp-format): {'; '.join(unplaced[:5])}")
    counts["days_after_last_day"] = len(later_days)
    return days, counts


def write_days(days: dict[date, list[list[str]]], out: Path) -> None:
    """Each file written whole, then renamed: a landing sensor never sees half a day."""
    out.mkdir(parents=True, exist_ok=True)
    for day, lines in sorted(days.items()):
        partial = out / f".{day.isoformat()}.csv.partial"
        with partial.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows(lines)
        os.replace(partial, out / f"{day.isoformat()}.csv")


def closed_calendar(days_with_files: list[date]) -> tuple[list[str], list[date]]:
    """The weekdays that never have a file, and the other days without one, between the first
    and the last day that has one: what LANDING_CLOSED_WEEKDAYS and LANDING_CLOSED_DAYS say."""
    present = set(days_with_files)
    if not present:
        return [], []
    every = [min(present) + timedelta(days=n) for n in range((max(present) - min(present)).days + 1)]
    # a weekday is closed when four weeks or more never had one; a shorter span tells only days
    open_weekdays = {day.weekday() for day in present} if len(every) >= 28 else set(range(7))
    closed_weekdays = [WEEKDAYS[n] for n in range(7) if n not in open_weekdays]
    return closed_weekdays, [day for day in every if day not in present and day.weekday() in open_weekdays]


def split(source: Path, out: Path, encoding: str = "utf-8", timestamp_format: str = ISO_SECONDS,
          last_day: date = DEVELOPMENT_LAST_DAY) -> dict:
    if not source.is_file():
        raise SplitError(f"{source}: no such file")
    is_excel = source.suffix.lower() in (".xlsx", ".zip")
    rows = xlsx_rows(source) if is_excel else csv_rows(source, encoding)
    try:
        days, counts = split_days(rows, str(source), timestamp_format, last_day)
    except UnicodeDecodeError as error:
        raise SplitError(f"{source}: not {encoding} ({error.reason}); set --encoding") from None
    write_days(days, out)
    weekdays, closed = closed_calendar(list(days))
    return {**counts, "days_written": len(days), "lines_written": sum(len(lines) for lines in days.values()),
            "first_day": min(days).isoformat() if days else None, "last_day": max(days).isoformat() if days else None,
            "closed_weekdays": weekdays, "closed_days": [day.isoformat() for day in closed]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="online+retail.zip, Online Retail.xlsx, or a CSV with the same columns")
    parser.add_argument("--out", type=Path, default=Path("data/online-retail/by-day"))
    parser.add_argument("--encoding", default="utf-8", help="of a CSV source (Kaggle's copy: latin-1)")
    parser.add_argument("--timestamp-format", default=ISO_SECONDS,
                        help="InvoiceDate in a CSV source (Kaggle's copy: '%%m/%%d/%%Y %%H:%%M')")
    parser.add_argument("--last-day", type=date.fromisoformat, default=DEVELOPMENT_LAST_DAY,
                        help="the last day written (default 2011-08-31; the later months are the independent check)")
    args = parser.parse_args(argv)
    try:
        report = split(args.source, args.out, args.encoding, args.timestamp_format, args.last_day)
    except SplitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{report['lines_written']:,} lines in {report['days_written']} day files under {args.out} "
          f"({report['first_day']} .. {report['last_day']}); {report['lines_after_last_day']:,} lines of "
          f"{report['days_after_last_day']} days after {args.last_day} not written")
    print("Land them with:")
    print(f"  LANDING_TRANSACTIONS_PATTERN={args.out.resolve()}/{{date}}.csv")
    if report["closed_weekdays"]:
        print(f"  LANDING_CLOSED_WEEKDAYS={','.join(report['closed_weekdays'])}")
    if report["closed_days"]:
        print(f"  LANDING_CLOSED_DAYS={','.join(report['closed_days'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
