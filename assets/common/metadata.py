"""Materialization metadata helpers: previews and summaries a person can read in the UI.

Metadata is stored in the Dagster event log, which everyone with UI access reads: every table
made here masks the personal columns of the source registry by name and any email address in
any cell (resources/redaction.py).
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import duckdb

from assets.common.sources import personal_columns
from resources.redaction import mask_column, mask_emails


def markdown_table(columns: list[str], rows: list[tuple[Any, ...]], max_width: int = 60) -> str:
    personal = personal_columns()

    def cell(value: Any, column: str) -> str:
        value = mask_column(value, personal[column]) if column in personal else value
        text = "" if value is None else mask_emails(str(value))
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, columns)) + " |" for row in rows]
    return "\n".join(lines)


def table_preview(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None, limit: int = 5) -> dg.MarkdownMetadataValue:
    """A few rows of a query as a markdown table (the query must not be huge-scan expensive)."""
    result = con.execute(f"SELECT * FROM ({sql}) LIMIT {int(limit)}", params or [])
    columns = [d[0] for d in result.description]
    return dg.MetadataValue.md(markdown_table(columns, result.fetchall()))


def table_schema(con: duckdb.DuckDBPyConnection, table: str) -> dg.TableSchema:
    result = con.execute(f"DESCRIBE {table}")
    rows = result.fetchall()
    return dg.TableSchema(columns=[dg.TableColumn(name=r[0], type=str(r[1])) for r in rows])
