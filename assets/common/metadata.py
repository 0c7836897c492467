"""Materialization metadata helpers: previews and summaries a person can read in the UI."""

from __future__ import annotations

from typing import Any

import dagster as dg
import duckdb


def markdown_table(columns: list[str], rows: list[tuple[Any, ...]], max_width: int = 60) -> str:
    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
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
