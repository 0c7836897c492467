"""Landing files as the world writes them -> temp tables, as text, with the line number of every record.

Each source becomes `stg_<table>` (row_id, line_no, the raw table's columns as text as they
arrived, raw_record where cheap) plus `unparseable` (lines that never became a record: bad JSON,
wrong column count, invalid UTF-8), all inside the caller's connection. Parsing is DuckDB's:
`read_csv` with `store_rejects` for CSV, one `json_transform` per line for JSON Lines.

Line numbers: a plain one-column read of the file numbers every physical line (blank lines
included); lines DuckDB cannot decode are missing from that read but listed with their number in
its rejects, so row k of the read is line k shifted by the rejected lines before it.
"""

import json
from pathlib import Path

import duckdb

from assets.common.sources import RawTable, Source
from resources.landing import LandingFileError
from resources.warehouse import fetch_scalar

MAX_LINE_BYTES = 8 << 20  # a longer line is quarantined as unparseable
READ_BUFFER_BYTES = 32 << 20  # DuckDB would otherwise size its CSV buffer from the line limit (GBs)
LINE_DELIMITER = "\x1e"  # never in a JSON line (control characters must be escaped in JSON)

CUSTOMER_JSON_SHAPE = json.dumps({
    "id": "VARCHAR", "email": "VARCHAR", "createdAt": "VARCHAR",
    # Amounts stay raw JSON tokens, so that "12.5" (a string) is told apart from 12.5 (a number).
    "purchaseHistory": [{"productId": "VARCHAR", "amount": "JSON", "date": "VARCHAR"}],
})


def read_lines(con: duckdb.DuckDBPyConnection, path: Path, into: str, keep_text: str = "TRUE",
               parsed: str = "NULL") -> None:
    """Every physical line of a file as a row of `into` (line_no from 1, blank lines as NULL).

    Lines DuckDB cannot decode (invalid UTF-8) are left out of `into` and listed, with their line
    number and an approximation of their text, in `<into>_rejects`. `parsed` is SQL over `line`
    computed while reading; the text itself is kept only where `keep_text` (SQL over `line`,
    `parsed` and `ordinality`, the row's position in the read) is true.
    """
    rejects = f"{into}_rejects"
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {into}_read AS
        SELECT ordinality AS k, line IS NULL OR trim(line, ' ' || chr(13) || chr(9)) = '' AS blank,
               {parsed} AS parsed, CASE WHEN {keep_text} THEN line END AS line
        FROM read_csv($path, columns = {{'line': 'VARCHAR'}}, header = false, auto_detect = false,
                      delim = '{LINE_DELIMITER}', quote = '', escape = '', new_line = '\\n',
                      max_line_size = {MAX_LINE_BYTES}, buffer_size = {READ_BUFFER_BYTES}, store_rejects = true,
                      rejects_table = '{rejects}_raw', rejects_scan = '{rejects}_scan')
        WITH ORDINALITY""",
        {"path": str(path)},
    )
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {rejects} AS
        SELECT line AS line_no, min(error_type)::VARCHAR AS error_type, any_value(csv_line) AS raw_record
        FROM {rejects}_raw GROUP BY line""")
    _number_lines(con, f"{into}_read", rejects, into)


def _number_lines(con: duckdb.DuckDBPyConnection, read: str, rejects: str, into: str) -> None:
    """Row k of the read is physical line k, shifted by the rejected lines before it."""
    if not fetch_scalar(con, f"SELECT count(*) FROM {rejects}"):
        con.execute(f"ALTER TABLE {read} RENAME COLUMN k TO line_no")
        con.execute(f"DROP TABLE IF EXISTS {into}")  # a connection may stage several files
        con.execute(f"ALTER TABLE {read} RENAME TO {into}")
        return
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {into} AS
        SELECT r.k + coalesce(s.shift, 0) AS line_no, r.* EXCLUDE (k)
        FROM {read} AS r ASOF LEFT JOIN (
            SELECT line_no - row_number() OVER (ORDER BY line_no) AS rows_before,
                   row_number() OVER (ORDER BY line_no) AS shift
            FROM {rejects}) AS s
          ON r.k > s.rows_before""")
    con.execute(f"DROP TABLE {read}")


def check_header(source: str, path: Path, expected: list[str]) -> None:
    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        header = first.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise LandingFileError(source, path, "unreadable header (not UTF-8)") from None
    if [h.strip() for h in header.split(",")] != expected:
        raise LandingFileError(source, path, f"unexpected header {header!r}; expected {','.join(expected)!r}")


def _create_work_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""CREATE OR REPLACE TEMP TABLE unparseable (
        line_no BIGINT, rule VARCHAR, column_name VARCHAR, raw_record VARCHAR)""")


def stage_csv(con: duckdb.DuckDBPyConnection, path: Path, source: Source) -> dict[str, int]:
    """A CSV file: DuckDB's parser for the fields, the plain line read for line numbers and raw text.
    Returns the number of input records per table."""
    header, table = source.fields, source.tables[0].name
    check_header(source.name, path, list(header))
    _create_work_tables(con)
    read_lines(con, path, "src_lines")
    columns = ", ".join(f"'{raw}': 'VARCHAR'" for raw in header.values())
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE parsed AS
        SELECT ordinality AS k, * EXCLUDE (ordinality)
        FROM read_csv($path, columns = {{{columns}}}, header = true, auto_detect = false, delim = ',',
                      quote = '"', escape = '"', max_line_size = {MAX_LINE_BYTES}, buffer_size = {READ_BUFFER_BYTES},
                      store_rejects = true,
                      rejects_table = 'parse_rejects', rejects_scan = 'parse_rejects_scan')
        WITH ORDINALITY""",
        {"path": str(path)},
    )
    con.execute("""INSERT INTO unparseable
        SELECT line, CASE WHEN min(error_type)::VARCHAR LIKE '%COLUMNS%' THEN 'wrong_column_count'
                          WHEN min(error_type)::VARCHAR LIKE '%ENCODING%' THEN 'bad_encoding'
                          ELSE 'unparseable_line' END,
               any_value(column_name), any_value(csv_line)
        FROM parse_rejects GROUP BY line""")
    _align_parsed_rows(con, table, list(header.values()))
    return {table: _records_in_file(con, "src_lines", first_line=2)}


def _records_in_file(con: duckdb.DuckDBPyConnection, lines: str, first_line: int) -> int:
    """Input records: the non-blank lines from `first_line` on, decodable or not."""
    readable = fetch_scalar(con, f"SELECT count(*) FROM {lines} WHERE line_no >= ? AND NOT blank", [first_line])
    undecodable = fetch_scalar(con, f"SELECT count(*) FROM {lines}_rejects WHERE line_no >= ?", [first_line])
    return int(readable) + int(undecodable)


def _align_parsed_rows(con: duckdb.DuckDBPyConnection, table: str, columns: list[str]) -> None:
    """Parsed row k is the k-th data line that is neither blank nor rejected by the parser.

    That holds while no quoted field spans lines; when it does not, line numbers fall back to
    the row order and the raw text to the joined fields.
    """
    con.execute("""CREATE OR REPLACE TEMP TABLE data_lines AS
        SELECT line_no, line, row_number() OVER (ORDER BY line_no) AS k FROM src_lines
        WHERE line_no > 1 AND NOT blank AND line_no NOT IN (SELECT line_no FROM unparseable)""")
    aligned = fetch_scalar(con, "SELECT count(*) FROM data_lines") == fetch_scalar(con, "SELECT count(*) FROM parsed")
    names = ", ".join(f'p."{c}"' for c in columns)
    if aligned:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE stg_{table} AS
            SELECT p.k AS row_id, d.line_no, d.line AS raw_record, {names}
            FROM parsed AS p JOIN data_lines AS d USING (k)""")
    else:
        joined = " || ',' || ".join(f"coalesce(p.\"{c}\", '')" for c in columns)
        con.execute(f"""CREATE OR REPLACE TEMP TABLE stg_{table} AS
            SELECT p.k AS row_id, p.k + 1 AS line_no, {joined} AS raw_record, {names} FROM parsed AS p""")


def stage_customers(con: duckdb.DuckDBPyConnection, path: Path, source: Source) -> dict[str, int]:
    """JSON Lines: parsed once per line while reading; a line that is not a JSON object is kept
    whole for the quarantine. The items of valid customers are staged after their validation."""
    _create_work_tables(con)
    # One JSON parse per line; `try` turns a malformed line into NULL instead of an error.
    parse = f"CASE WHEN starts_with(ltrim(line), '{{') THEN try(json_transform(line, '{CUSTOMER_JSON_SHAPE}')) END"
    read_lines(con, path, "json_lines", keep_text="parsed IS NULL", parsed=parse)
    records = _records_in_file(con, "json_lines", first_line=1)
    con.execute("""INSERT INTO unparseable
        SELECT line_no, 'malformed_json', NULL, line FROM json_lines WHERE parsed IS NULL AND NOT blank
        UNION ALL
        SELECT line_no, CASE WHEN error_type LIKE '%ENCODING%' THEN 'bad_encoding' ELSE 'malformed_json' END,
               NULL, raw_record FROM json_lines_rejects""")
    # A view, not a copy: the parsed lines (with their item lists) are the biggest thing staged.
    con.execute("""CREATE OR REPLACE TEMP VIEW stg_customers AS
        SELECT line_no AS row_id, line_no, parsed.id AS customer_id, parsed.email AS email,
               parsed.createdAt AS created_at, len(parsed.purchaseHistory) AS purchase_count,
               parsed.purchaseHistory AS items
        FROM json_lines WHERE parsed IS NOT NULL""")
    return {"customers": records}


def stage_customer_purchases(con: duckdb.DuckDBPyConnection, table: RawTable) -> int:
    """The purchase items of the customers that passed their own rules, one row per item.

    row_id packs (line, position): an 8 MB line cannot hold 2^20 items, so ids never collide."""
    con.execute("""CREATE OR REPLACE TEMP TABLE stg_customer_purchases AS
        SELECT (c.line_no << 20) + u.position AS row_id, c.line_no, (u.position - 1)::INTEGER AS item_no, c.customer_id,
               u.item.productId AS product_id, u.item.amount AS amount, u.item.date AS purchased_at
        FROM (SELECT * FROM stg_customers WHERE row_id NOT IN (SELECT row_id FROM failures_customers)) AS c,
             unnest(c.items) WITH ORDINALITY AS u(item, position)""")
    return int(fetch_scalar(con, "SELECT count(*) FROM stg_customer_purchases"))
