"""The fetch step's split (bench/online_retail_days.py): UCI's workbook or Kaggle's CSV becomes
the day files the project reads, the same bytes as the shared copy, and nothing is lost."""

from __future__ import annotations

import csv
import re
import zipfile
from datetime import date, datetime
from pathlib import Path

import pytest
from openpyxl import Workbook

from bench.online_retail_days import COLUMNS, SplitError, closed_calendar, main, split

DAYS = ["2010-12-01", "2011-01-05", "2011-01-06"]  # 2011-01-05 holds "£" (gift vouchers)
README = Path(__file__).resolve().parents[1] / "README.md"


def shared_rows(folder: Path, days: list[str]):
    for day in days:
        with (folder / f"{day}.csv").open(newline="", encoding="utf-8") as handle:
            yield from list(csv.reader(handle))[1:]


def write_uci_workbook(folder: Path, days: list[str], path: Path) -> None:
    """The cells as UCI's `Online Retail.xlsx` types them: numeric invoice and stock codes as
    integers, dates as dates, customer ids as integers, an empty description as no value."""
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet("Online Retail")
    sheet.append(COLUMNS)
    as_number = lambda text: int(text) if text.isdigit() else text  # noqa: E731
    for invoice, code, text, quantity, at, price, customer, country in shared_rows(folder, days):
        sheet.append([as_number(invoice), as_number(code), text or None, int(quantity), datetime.fromisoformat(at),
                      float(price), int(float(customer)) if customer else None, country])
    workbook.save(path)


def write_kaggle_csv(folder: Path, days: list[str], path: Path) -> None:
    """Kaggle's `data.csv`: Latin-1, CRLF, US dates without seconds, integer customer ids."""
    with path.open("w", newline="", encoding="latin-1") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        for invoice, code, text, quantity, at, price, customer, country in shared_rows(folder, days):
            at = datetime.fromisoformat(at)
            writer.writerow([invoice, code, text, quantity, f"{at.month}/{at.day}/{at.year} {at.hour}:{at.minute:02d}",
                             price, customer.removesuffix(".0"), country])


def assert_same_files(out: Path, folder: Path, days: list[str]) -> None:
    assert sorted(path.name for path in out.iterdir()) == [f"{day}.csv" for day in days]  # no partial file left
    for day in days:
        assert (out / f"{day}.csv").read_bytes() == (folder / f"{day}.csv").read_bytes(), day


def test_uci_workbook_in_its_zip_splits_into_the_shared_day_files_and_later_days_are_counted_not_written(
        online_retail_dir, tmp_path):
    workbook = tmp_path / "Online Retail.xlsx"
    write_uci_workbook(online_retail_dir, DAYS, workbook)
    download = tmp_path / "online+retail.zip"
    with zipfile.ZipFile(download, "w") as archive:
        archive.write(workbook, workbook.name)

    report = split(download, tmp_path / "by-day", last_day=date(2011, 1, 5))

    assert_same_files(tmp_path / "by-day", online_retail_dir, DAYS[:2])
    lines = [len(list(shared_rows(online_retail_dir, [day]))) for day in DAYS]
    assert report["lines"] == sum(lines)  # every line read is written or counted as after the last day
    assert (report["lines_written"], report["days_written"]) == (lines[0] + lines[1], 2)
    assert (report["lines_after_last_day"], report["days_after_last_day"]) == (lines[2], 1)


def test_a_workbook_declaring_a_smaller_range_than_it_holds_is_read_whole(online_retail_dir, tmp_path):
    """Read-only openpyxl trusts the sheet's declared range: A1:A1 would have read the header only."""
    built = tmp_path / "built.xlsx"
    write_uci_workbook(online_retail_dir, DAYS[:1], built)
    workbook = tmp_path / "Online Retail.xlsx"
    with zipfile.ZipFile(built) as source, zipfile.ZipFile(workbook, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = data.replace(b"<sheetViews>", b'<dimension ref="A1:A1"/><sheetViews>', 1)
                assert b"A1:A1" in data
            target.writestr(item, data)
    split(workbook, tmp_path / "by-day")
    assert_same_files(tmp_path / "by-day", online_retail_dir, DAYS[:1])


def test_kaggles_latin_1_csv_with_us_dates_splits_into_the_same_files_once_told_how_it_is_written(
        online_retail_dir, tmp_path, capsys):
    source = tmp_path / "data.csv"
    write_kaggle_csv(online_retail_dir, DAYS, source)
    out = tmp_path / "by-day"

    assert main([str(source), "--out", str(out)]) == 2
    assert "not utf-8" in capsys.readouterr().err and not out.exists()
    assert main([str(source), "--out", str(out), "--encoding", "latin-1"]) == 2
    error = capsys.readouterr().err
    assert "row 2: InvoiceDate '12/1/2010 8:26'" in error and "--timestamp-format" in error and not out.exists()

    assert main([str(source), "--out", str(out), "--encoding", "latin-1",
                 "--timestamp-format", "%m/%d/%Y %H:%M"]) == 0
    assert_same_files(out, online_retail_dir, DAYS)
    assert f"LANDING_TRANSACTIONS_PATTERN={out.resolve()}/{{date}}.csv" in capsys.readouterr().out


def test_one_row_without_a_readable_date_stops_the_split_naming_it_and_writes_nothing(tmp_path):
    source = tmp_path / "lines.csv"
    source.write_text(",".join(COLUMNS) + "\n"
                      "536365,85123A,HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
                      "536366,22633,WARMER,6,2010-12-32 08:28:00,1.85,17850.0,United Kingdom\n", encoding="utf-8")
    with pytest.raises(SplitError, match=r"1 row\(s\) whose InvoiceDate .* row 3: InvoiceDate '2010-12-32 08:28:00'"):
        split(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    source.write_text("InvoiceNo,StockCode,Description,Quantity,UnitPrice,CustomerID,Country\n", encoding="utf-8")
    with pytest.raises(SplitError, match="no column InvoiceDate"):
        split(source, tmp_path / "out")


def test_values_are_not_judged_a_bad_quantity_reaches_the_pipeline_as_written(tmp_path):
    """The pipeline quarantines such a line with its reason; the split must not repair or drop it."""
    source = tmp_path / "lines.csv"
    source.write_text(",".join(COLUMNS) + "\n"
                      "536365,85123A,HEART,six,2010-12-01 08:26:00,-2.55,,United Kingdom\n", encoding="utf-8")
    split(source, tmp_path / "out")
    assert (tmp_path / "out" / "2010-12-01.csv").read_text(encoding="utf-8").splitlines()[1] == \
        "536365,85123A,HEART,six,2010-12-01 08:26:00,-2.55,,United Kingdom"


def test_the_landing_calendar_the_split_prints_for_online_retail_is_the_one_the_readme_gives(online_retail_dir):
    days = [date.fromisoformat(path.stem) for path in online_retail_dir.glob("*.csv")]
    weekdays, closed = closed_calendar(days)
    assert weekdays == ["Sat"]
    readme_days = re.search(r"LANDING_CLOSED_DAYS=([0-9,-]+)", README.read_text(encoding="utf-8")).group(1)
    assert ",".join(day.isoformat() for day in closed) == readme_days
    # a span under four weeks tells no weekday, only the days without a file
    assert closed_calendar([date(2011, 1, 3), date(2011, 1, 5)]) == ([], [date(2011, 1, 4)])
