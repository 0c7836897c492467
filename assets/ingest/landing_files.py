"""Landing files as the world writes them -> temp tables of text, with the line number of every record.

Each source becomes `stg_<table>` (row_id, line_no, the raw table's columns as text as they
arrived, raw_record where cheap) plus `unparseable` (records that never became one: bad JSON,
wrong column count, invalid UTF-8, an over-long line), all inside the caller's connection.

The bytes are read here, in blocks, not by DuckDB's file readers: `read_csv` fails the whole file
on a carriage return in duckdb 2.0.1 ("CSV Parser state machine reached an invalid state"), so
line endings, a BOM, gzip and undecodable lines are handled before DuckDB sees a line. The input
contract (README, "Input contract"):

- bytes: UTF-8 with or without a BOM; gunzipped when the name ends in `.gz` (and refused when it
  does not say what the bytes are); UTF-16/32, binary formats and whitespace-only files refused;
- lines: a file's line ending is LF (a CR before it belongs to it: CRLF), or CR when the file has
  no LF at all; any other CR is data. Line numbers count every physical line, blank ones too;
- records: a blank or whitespace-only line is not a record. CSV records follow RFC 4180 (quoted
  fields may hold delimiters, quotes and newlines; a record keeps the line number it starts on);
  JSON Lines records are one JSON object per line;
- a line that cannot be a record (undecodable, malformed, too long, wrong column count) is
  quarantined with its number; only a file that cannot be read at all fails the partition.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from assets.common.sources import RawTable, Source
from assets.validate.rules import validate_staged
from resources.landing import LandingFileError
from resources.warehouse import fetch_scalar

READ_BLOCK_BYTES = 16 << 20  # bytes read at a time: memory stays flat whatever the file size
# JSON Lines go to DuckDB's parser as Arrow batches of a block each, and its scan holds several
# at once beside its buffers: at 2M customers (1.69 GB) raw_customers peaked at 940-960 MiB with
# 16 MiB blocks, 872-893 MiB with 4 MiB, landing in the same time (29.9-34.8 s, 28.6-33.4 s).
JSON_BLOCK_BYTES = 4 << 20
# The second pass for quarantined lines runs beside the staged tables (DuckDB at its limit):
# 16 MiB blocks took 115 MiB more RSS there, and raw_customers' peak at 2M past 1 GiB.
RESCAN_BLOCK_BYTES = 1 << 20
MAX_LINE_BYTES = 8 << 20  # a longer line is quarantined as `line_too_long` (its first bytes kept)
KEPT_TEXT_CHARS = 4096  # how much of an over-long line's text the quarantine keeps
DECODE_PIECE_BYTES = 1 << 20  # lines decoded at a time to find undecodable ones
SEEK_BYTES = 1 << 20  # read at a time while counting or looking for line feeds
# CSV rows handed from the parse to DuckDB at a time: a 137 MB file parsed whole before its rows
# went to DuckDB peaked at 1,080-1,210 MB.
SINK_ROWS = 1 << 18
CR_STAND_IN = "\uffff"  # a Unicode noncharacter: carries a CR inside a CSV field through the csv module
csv.field_size_limit(MAX_LINE_BYTES)

UTF8_BOM = b"\xef\xbb\xbf"
GZIP_MAGIC = b"\x1f\x8b"
# Encodings and formats that are not UTF-8 text, by their first bytes (longest first).
NOT_UTF8_TEXT = (
    (b"\x00\x00\xfe\xff", "UTF-32 text (BOM 00 00 FE FF); expected UTF-8"),
    (b"\xff\xfe\x00\x00", "UTF-32 text (BOM FF FE 00 00); expected UTF-8"),
    (b"\xff\xfe", "UTF-16 text (BOM FF FE); expected UTF-8"),
    (b"\xfe\xff", "UTF-16 text (BOM FE FF); expected UTF-8"),
    (b"PK\x03\x04", "a ZIP archive (an .xlsx workbook?), not a text table"),
    (b"\xd0\xcf\x11\xe0", "an OLE2 document (an .xls workbook?), not a text table"),
    (b"%PDF", "a PDF document, not a text table"),
    (b"\x89PNG", "a PNG image, not a text table"),
    (b"PAR1", "a Parquet file, not a text table"),
    (b"SQLite format 3", "an SQLite database, not a text table"),
)
CSV_DELIMITERS = (",", ";", "\t", "|")  # tried in this order until the header names every field

CUSTOMER_JSON_SHAPE = json.dumps({
    "id": "VARCHAR", "email": "VARCHAR", "createdAt": "VARCHAR",
    # Amounts stay raw JSON tokens, so that "12.5" (a string) is told apart from 12.5 (a number).
    "purchaseHistory": [{"productId": "VARCHAR", "amount": "JSON", "date": "VARCHAR"}],
})
JSON_WHITESPACE = " \\t\\n\\r"  # in a regex character class: the characters JSON allows around a value
NO_RECORDS = "no records: the file holds only whitespace"


@dataclass
class Staged:
    """What a reader staged: input records per table, and how the file was read (for metadata)."""

    inputs: dict[str, int]
    notes: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Bytes: compression, encoding, line endings
# ---------------------------------------------------------------------------------------------

@contextmanager
def open_text_bytes(source: str, path: Path, byte_range: tuple[int, ...] | None = None, encoding: str | None = None
                    ) -> Iterator[tuple[BinaryIO, dict[str, Any]]]:
    """The file's bytes as UTF-8 text bytes (gunzipped, BOM removed, and from `encoding`, a
    single-byte one the landing zone sets for the source, when not UTF-8), with notes on what was done.

    LandingFileError (path and cause in one line) when the name and the bytes disagree about gzip,
    or the bytes are another encoding or format. `byte_range` (start, end): only those bytes of a
    plain file (a shard, assets/ingest/file_shards.py), or (start, end, read_on): then the bytes
    after `end` in pieces of `read_on` (ByteRangeReader); the checks of the file's start run in
    the shard that starts at 0."""
    read_on = byte_range[2] if byte_range is not None and len(byte_range) > 2 else 0
    if byte_range is not None and byte_range[0] > 0:
        with open(path, "rb", buffering=READ_BLOCK_BYTES) as raw:
            raw.seek(byte_range[0])
            yield as_utf8(ByteRangeReader(raw, byte_range[1], read_on), encoding), {"compression": None, "bom": False}
        return
    with open(path, "rb", buffering=READ_BLOCK_BYTES) as raw:
        named_gzip = path.name.lower().endswith(".gz")
        is_gzip = raw.peek(2)[:2] == GZIP_MAGIC
        if named_gzip and not is_gzip:
            raise LandingFileError(source, path, "named .gz but not gzip-compressed (no gzip header): "
                                                 "land it without .gz, or compress it")
        if is_gzip and not named_gzip:
            raise LandingFileError(source, path, "gzip-compressed, but its name does not end in .gz: "
                                                 f"rename it to {path.name}.gz")
        stream: BinaryIO = io.BufferedReader(gzip.GzipFile(fileobj=raw), READ_BLOCK_BYTES) if is_gzip else raw
        head = _peek(source, path, stream)
        if not head:
            raise LandingFileError(source, path, "empty (no bytes after gunzip)")
        for signature, cause in NOT_UTF8_TEXT:
            if head.startswith(signature):
                raise LandingFileError(source, path, cause)
        if b"\x00" in head[:64] and not head.startswith(UTF8_BOM):
            raise LandingFileError(source, path, "NUL bytes at the start: UTF-16/32 or binary, not UTF-8 text")
        bom = head.startswith(UTF8_BOM)
        if bom:
            stream.read(len(UTF8_BOM))
        if byte_range is not None:
            stream = ByteRangeReader(stream, byte_range[1], read_on)
        yield as_utf8(stream, encoding), {"compression": "gzip" if is_gzip else None, "bom": bom}


def as_utf8(stream: BinaryIO, encoding: str | None) -> BinaryIO:
    """The stream, or with a single-byte `encoding` its bytes re-encoded as UTF-8 as they are read."""
    return Reencoded(stream, encoding) if encoding else stream


class Reencoded:
    """A single-byte encoding's bytes (checked by resources.landing.checked_encoding) as UTF-8.
    Each byte is one character, so any piece converts alone and lines end where the file's do. A
    byte the encoding leaves undefined (cp1252's 0x81) stays as it is: not UTF-8, so its line is
    quarantined as bad_encoding, like any undecodable line."""

    def __init__(self, stream: BinaryIO, encoding: str):
        self.stream, self.encoding = stream, encoding

    def _utf8(self, data: bytes) -> bytes:
        return data if data.isascii() else data.decode(self.encoding, "surrogateescape").encode("utf-8", "surrogateescape")

    def read(self, size: int = -1) -> bytes:
        return self._utf8(self.stream.read(size))

    def peek(self, size: int) -> bytes:
        return self._utf8(self.stream.peek(size))


class ByteRangeReader:
    """A file's bytes up to an offset (the end of a shard): read() stops there. With `read_on`,
    the bytes after it follow in pieces of that many (a CSV shard reads on to the end of its last
    record, which is rarely far: small pieces keep it from reading a whole block of the next)."""

    def __init__(self, stream: BinaryIO, end: int, read_on: int = 0):
        self.stream, self.end, self.read_on = stream, end, read_on

    def read(self, size: int = -1) -> bytes:
        left = self.end - self.stream.tell()
        if left <= 0:
            return self.stream.read(self.read_on) if self.read_on else b""
        return self.stream.read(left if size < 0 else min(size, left))

    def peek(self, size: int) -> bytes:  # the file's head, for the delimiter of the shard at 0
        return self.stream.peek(size)


def count_lines(path: Path, start: int, end: int) -> int:
    """Physical lines in bytes [start, end) of a plain file cut after LFs: its LFs, and a last line
    without one at the file's end."""
    lines, last = 0, b""
    with open(path, "rb") as raw:
        raw.seek(start)
        while start < end and (piece := raw.read(min(SEEK_BYTES, end - start))):
            lines, last, start = lines + piece.count(b"\n"), piece[-1:], start + len(piece)
    return lines + (last not in (b"", b"\n"))


def offset_after_lines(path: Path, start: int, lines: int) -> int:
    """The offset just after the `lines`-th LF from `start` (the file's size if it has fewer)."""
    with open(path, "rb") as raw:
        raw.seek(start)
        while lines > 0 and (piece := raw.read(SEEK_BYTES)):
            found = -1
            for _ in range(min(lines, piece.count(b"\n"))):
                found = piece.index(b"\n", found + 1)
                lines -= 1
            start += found + 1 if lines == 0 else len(piece)
        return start if lines == 0 else path.stat().st_size


def _peek(source: str, path: Path, stream: BinaryIO) -> bytes:
    try:
        return stream.peek(64)[:64]
    except (OSError, EOFError, zlib.error) as error:
        raise LandingFileError(source, path, f"corrupt or truncated gzip data ({error})") from None


@dataclass
class LineBlock:
    """Whole physical lines of a file: `data` holds them with their terminators, line i ends at
    ends[i] (exclusive) and is line number first_line + i of the file."""

    first_line: int
    data: bytes
    ends: np.ndarray

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate(([0], self.ends[:-1]))

    def text_of(self, index: int, terminator: bytes) -> bytes:
        start = 0 if index == 0 else int(self.ends[index - 1])
        line = self.data[start:int(self.ends[index])]
        if line.endswith(terminator):
            line = line[: -len(terminator)]
        return line[:-1] if terminator == b"\n" and line.endswith(b"\r") else line


class LineReader:
    """Splits a text byte stream into blocks of physical lines, numbering them from 1.

    The line ending is the file's: LF (CRLF included), or CR for a file without any LF. A line
    longer than MAX_LINE_BYTES is not kept: its number and first bytes go to `too_long`."""

    def __init__(self, source: str, path: Path, stream: BinaryIO, detect_line_ending: bool = True,
                 block_bytes: int | None = None):
        self.source, self.path, self.stream = source, path, stream
        self.block_bytes = block_bytes or READ_BLOCK_BYTES
        self.terminator = b"\n"
        self.line_ending = "LF"
        self.lines_read = 0
        self.too_long: list[tuple[int, str]] = []
        self.detect_line_ending = detect_line_ending  # False: LF, as decided for the whole file

    def blocks(self) -> Iterator[LineBlock]:
        carry, skipping, first = b"", False, self.detect_line_ending
        while True:
            chunk = self._read()
            if first:
                self._detect_line_ending(chunk + self._peek_after(len(chunk)))
                first = False
            if not chunk:
                if carry and not skipping:
                    yield self._block(carry, np.array([len(carry)], dtype=np.int64))
                elif skipping:
                    self.lines_read += 1
                return
            data = carry + chunk if carry else chunk
            ends = np.flatnonzero(np.frombuffer(data, np.uint8) == self.terminator[0]) + 1
            if skipping and len(ends):  # the rest of an over-long line ends here
                self.lines_read += 1
                data, ends, skipping = data[ends[0]:], ends[1:] - ends[0], False
            if len(ends):
                yield from self._blocks_without_long_lines(data[:ends[-1]], ends)
                carry = data[ends[-1]:]
            else:
                carry = b"" if skipping else data
            if not skipping and len(carry) > MAX_LINE_BYTES:
                self.too_long.append((self.lines_read + 1, carry[:KEPT_TEXT_CHARS].decode("utf-8", "replace")))
                carry, skipping = b"", True

    def _blocks_without_long_lines(self, data: bytes, ends: np.ndarray) -> Iterator[LineBlock]:
        """The block, or its pieces around the lines longer than MAX_LINE_BYTES (noted in
        `too_long`, left out): such a line is refused wherever it falls, not only where it crosses
        a read's end (the carry above), so a file's shards and blocks never change the verdict."""
        too_long = np.flatnonzero(np.diff(ends, prepend=0) - 1 > MAX_LINE_BYTES).tolist()  # without the LF
        first = 0  # the first line of the next piece
        for index in too_long:
            if index > first:
                yield self._piece(data, ends, first, index)
            begin = int(ends[index - 1]) if index else 0
            self.too_long.append((self.lines_read + 1, data[begin:begin + KEPT_TEXT_CHARS].decode("utf-8", "replace")))
            self.lines_read, first = self.lines_read + 1, index + 1
        if first < len(ends):
            yield self._piece(data, ends, first, len(ends)) if first else self._block(data, ends)

    def _piece(self, data: bytes, ends: np.ndarray, first: int, stop: int) -> LineBlock:
        """Lines first..stop-1 of a block as a block of their own."""
        offset = int(ends[first - 1]) if first else 0
        return self._block(data[offset:int(ends[stop - 1])], ends[first:stop] - offset)

    def _read(self) -> bytes:
        try:
            return self.stream.read(self.block_bytes)
        except (OSError, EOFError, zlib.error) as error:
            raise LandingFileError(self.source, self.path, f"corrupt or truncated gzip data ({error})") from None

    def _peek_after(self, have: int) -> bytes:
        """The bytes after a first block smaller than READ_BLOCK_BYTES, up to that many in all, left
        unread: a file's line ending is decided on its first 16 MiB whatever the block size."""
        peek = getattr(self.stream, "peek", None)
        return peek(READ_BLOCK_BYTES - have)[: READ_BLOCK_BYTES - have] if peek and have < READ_BLOCK_BYTES else b""

    def _detect_line_ending(self, chunk: bytes) -> None:
        if b"\n" not in chunk and b"\r" in chunk:
            self.terminator, self.line_ending = b"\r", "CR"
        elif b"\r\n" in chunk:
            self.line_ending = "CRLF"

    def _block(self, data: bytes, ends: np.ndarray) -> LineBlock:
        block = LineBlock(self.lines_read + 1, data, ends.astype(np.int64))
        self.lines_read += len(ends)
        return block

    @property
    def notes(self) -> dict[str, Any]:
        return {"line_ending": self.line_ending, "physical_lines": self.lines_read}


def decoded_lines(block: LineBlock, terminator: bytes) -> Iterator[tuple[int, str, bool]]:
    """(line number, text without its terminator, decodes as UTF-8) of every line of a block.

    An undecodable line is returned with its bad bytes as surrogates (`surrogateescape`), so a
    CSV record spanning it can still be told apart from its neighbours."""
    for index in range(len(block.ends)):
        raw = block.text_of(index, terminator)
        try:
            yield block.first_line + index, raw.decode("utf-8"), True
        except UnicodeDecodeError:
            yield block.first_line + index, raw.decode("utf-8", "surrogateescape"), False


def printable(text: str) -> str:
    """Text with undecodable bytes (surrogates) shown as U+FFFD, as it can be stored."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _create_work_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("""CREATE OR REPLACE TEMP TABLE unparseable (
        line_no BIGINT, rule VARCHAR, column_name VARCHAR, raw_record VARCHAR)""")


def _add_unparseable(con: duckdb.DuckDBPyConnection, rows: list[tuple[int, str, str | None, str]]) -> None:
    if rows:  # through Arrow: executemany costs 0.4 ms a row (0.37 s for 807)
        line_no, rule, column_name, raw_record = zip(*rows)
        con.register("unparseable_rows", pa.table({
            "line_no": pa.array(line_no, pa.int64()), "rule": pa.array(rule, pa.string()),
            "column_name": pa.array(column_name, pa.string()), "raw_record": pa.array(raw_record, pa.string())}))
        try:
            con.execute("INSERT INTO unparseable SELECT * FROM unparseable_rows")
        finally:
            con.unregister("unparseable_rows")


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

@dataclass
class CsvHeader:
    """Which column of the file holds each field of the source, and what was left aside."""

    delimiter: str
    width: int
    positions: dict[str, int]  # raw column -> index in a record
    ignored: list[str]


def _header_names(cells: list[str]) -> list[str]:
    return [cell.strip().strip('"').strip().casefold() for cell in cells]


def sniff_delimiter(head: bytes, source: Source) -> str:
    """The delimiter whose split of the first non-blank line names every field (default ',')."""
    text = head.decode("utf-8", "replace")
    first = next((line for line in text.replace("\r", "\n").split("\n") if line.strip()), "")
    for delimiter in CSV_DELIMITERS:
        names = _header_names(next(csv.reader([first], delimiter=delimiter), []))
        if all(f.casefold() in names for f in source.fields):
            return delimiter
    return ","


def match_header(source: Source, path: Path, cells: list[str], delimiter: str) -> CsvHeader:
    """Columns are matched by name (quotes, surrounding spaces and case aside), in any order;
    extra columns are ignored (noted), a missing field is a clear error naming it."""
    names = _header_names(cells)
    missing = [f for f in source.fields if f.casefold() not in names]
    if missing:
        shown = ",".join(c.strip() for c in cells) if len(cells) <= 30 else f"{len(cells)} columns"
        raise LandingFileError(source.name, path, f"missing column(s) {', '.join(missing)} in the header "
                                                  f"({shown!r}); expected {','.join(source.fields)} in any order")
    wanted = {field_name.casefold(): raw for field_name, raw in source.fields.items()}
    positions, ignored = {}, []
    for index, name in enumerate(names):
        if name in wanted and wanted[name] in positions:
            raise LandingFileError(source.name, path, f"column {cells[index].strip()!r} appears twice in the header")
        if name in wanted:
            positions[wanted[name]] = index
        else:
            ignored.append(cells[index].strip())
    return CsvHeader(delimiter, len(cells), positions, ignored)


# What Python's str.strip() removes (every character whose isspace() is true), for Arrow's trim.
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                 "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
SIMPLE_LINES_SCHEMA = pa.schema([("line_no", pa.int64()), ("line", pa.string())])


class CsvRecords:
    """RFC 4180 records over the decoded physical lines of a file, in file order: one at a time
    from the stdlib csv module (with the line it starts on and its raw text), or, for a block of
    simple lines (`simple_lines`), the whole block as one Arrow table of (line_no, line), each
    line a record split at the delimiter alone. Blank lines are counted, not returned.

    A block is judged on its own only where a record ended with the block before it (a quoted
    field may run on into the next block: the csv module then reads on).

    A quoted field may hold line ends, but a record that runs on past its first line is a stray
    quote that swallowed the lines after it when it is not a well-formed record (the wrong number
    of fields, or a field over the size limit), or when a line it took is on its own a record of
    the header's width: its first line alone is refused (`unbalanced_quote`) and reading starts
    again on the next line, so the lines it took are judged as records of their own, not hidden
    in one quarantined record or one long field. `width` is the header's, once known.

    `stop_line` (a shard of the file): only the records that start on a line up to it, the last
    of them read to its end wherever that is; `last_line` is the last line they took."""

    def __init__(self, reader: LineReader, delimiter: str, simple_blocks: bool = True,
                 stop_line: int | None = None):
        self.reader, self.delimiter, self.simple_blocks = reader, delimiter, simple_blocks
        self.stop_line = stop_line
        self.last_line = reader.lines_read
        self.header_end: int | None = None  # the line the header's record ends on
        self.blank_lines = 0
        self.undecodable: list[tuple[int, str]] = []  # lines of simple blocks that are not UTF-8
        self.width: int | None = None
        self._consumed: list[tuple[int, str, bool]] = []
        self._read_again: deque[tuple[int, str, bool]] = deque()  # the lines a stray quote swallowed
        self._at_end = False
        self._blocks: Iterator[LineBlock] = iter(())

    def __iter__(self) -> Iterator[pa.Table | tuple[int, list[str] | None, str, str | None]]:
        """Arrow tables of simple lines, or (first line, fields or None, raw text, the rule that
        refuses it or None)."""
        self._blocks = self.reader.blocks()
        for block in self._blocks:
            if self._stopped(block.first_line):
                return
            simple = simple_lines(block, self.reader.terminator, self.undecodable) if self.simple_blocks else None
            if simple is not None:
                yield self._up_to_stop(simple, block)
            else:
                yield from self._records(block)

    def _stopped(self, next_line: int) -> bool:
        """Whether the record starting on `next_line` belongs to the next shard."""
        return self.stop_line is not None and next_line > self.stop_line

    def _up_to_stop(self, simple: pa.Table, block: LineBlock) -> pa.Table:
        self.last_line = block.first_line + len(block.ends) - 1
        if self._stopped(self.last_line):
            self.last_line = self.stop_line
            simple = simple.filter(pc.less_equal(simple["line_no"], self.stop_line))
            self.undecodable = [(n, text) for n, text in self.undecodable if n <= self.stop_line]
        return simple

    def _records(self, block: LineBlock) -> Iterator[tuple[int, list[str] | None, str, str | None]]:
        """The csv module's records from this block on, up to one that ends with a block."""
        parser = csv.reader(self._lines(block), delimiter=self.delimiter, strict=False)
        while not self._stopped(self.last_line + 1):
            try:
                fields, problem = next(parser), None
            except StopIteration:
                return
            except csv.Error:  # e.g. a field over the size limit; the parser goes on with the next line
                fields, problem = None, "unparseable_line"
            lines, self._consumed = self._consumed, []
            if self._stopped(lines[0][0]):  # after an over-long line, which the reader left out
                return
            if len(lines) > 1 and self._stray_quote(fields, lines[1:]):
                self._read_again.extend(lines[1:])
                lines, fields, problem = lines[:1], None, "unbalanced_quote"
                if self._at_end:  # the parser has seen the file end: a new one reads the lines again
                    parser = csv.reader(self._lines(None), delimiter=self.delimiter, strict=False)
            self.last_line = lines[-1][0]
            if fields is not None and (not fields or (len(fields) == 1 and not fields[0].strip())):
                self.blank_lines += len(lines)
                continue
            raw = "\n".join(text for _, text, _ in lines)
            if not all(decodes for _, _, decodes in lines):
                fields, problem, raw = None, "bad_encoding", printable(raw)
            yield lines[0][0], _restore_cr(fields) if "\r" in raw else fields, raw, problem

    def _stray_quote(self, fields: list[str] | None, taken: list[tuple[int, str, bool]]) -> bool:
        """Whether the quote that opened a record's first line swallowed the lines after it: the
        record is not well-formed, or a line it took is on its own a record of the header's width
        (the quote was closed by a stray one further on, and the fields happened to add up)."""
        if self.width is None:
            return False
        if fields is None or len(fields) != self.width:
            return True
        for _, text, _ in taken:
            try:
                alone = next(csv.reader([text], delimiter=self.delimiter, strict=False), [])
            except csv.Error:
                continue
            if len(alone) == self.width:
                return True
        return False

    def _lines(self, block: LineBlock | None) -> Iterator[str]:
        self._at_end = False
        while True:
            yield from self._lines_read_again()
            if block is None:
                self._at_end = True
                return
            for line in decoded_lines(block, self.reader.terminator):
                yield from self._lines_read_again()
                yield self._consume(line)
            yield from self._lines_read_again()
            if not self._consumed:
                return  # a record ended with the block: the next block is judged on its own
            block = next(self._blocks, None)

    def _lines_read_again(self) -> Iterator[str]:
        while self._read_again:
            yield self._consume(self._read_again.popleft())

    def _consume(self, line: tuple[int, str, bool]) -> str:
        self._consumed.append(line)
        text = line[1]
        # The csv module ends a record at any CR; a CR inside a line is data here.
        return (text.replace("\r", CR_STAND_IN) if "\r" in text else text) + "\n"


def simple_lines(block: LineBlock, terminator: bytes, undecodable: list[tuple[int, str]]) -> pa.Table | None:
    """The block's lines as an Arrow table (line_no, line without its ending) when the csv module
    would read each line as one record split at the delimiter alone: no quote character and no CR
    but a CRLF's (and no line over MAX_LINE_BYTES, the csv field size limit: the LineReader keeps
    none). A line that is not valid UTF-8 goes to `undecodable`, as the csv module's reading
    refuses it. None otherwise: the block goes through the csv module."""
    data = block.data
    if terminator != b"\n" or b'"' in data or data.count(b"\r") != data.count(b"\r\n"):
        return None
    numbers, text = decodable_lines(block, terminator, undecodable)
    return pa.Table.from_arrays([pa.array(numbers), pc.utf8_rtrim(text, characters="\r\n")],
                                schema=SIMPLE_LINES_SCHEMA)


def decodable_lines(block: LineBlock, terminator: bytes, undecodable: list[tuple[int, str]]
                    ) -> tuple[np.ndarray, pa.Array]:
    """The numbers and text (with their endings) of a block's lines that are valid UTF-8; the
    others go to `undecodable` as (line number, printable text)."""
    offsets = np.concatenate(([0], block.ends)).astype(np.int32)  # a block is well under 2 GiB
    lines = pa.Array.from_buffers(pa.binary(), len(block.ends), [None, pa.py_buffer(offsets), pa.py_buffer(block.data)])
    numbers = np.arange(block.first_line, block.first_line + len(block.ends), dtype=np.int64)
    try:
        return numbers, lines.cast(pa.string())  # validates UTF-8 for the whole block at once
    except pa.ArrowInvalid:
        bad = np.unique(np.searchsorted(block.ends, _undecodable_bytes(block), side="right"))
        for index in bad:
            undecodable.append((block.first_line + int(index), printable(
                block.text_of(int(index), terminator).decode("utf-8", "surrogateescape"))))
        keep = np.ones(len(block.ends), dtype=bool)
        keep[bad] = False
        return numbers[keep], lines.filter(pa.array(keep)).cast(pa.string())


_bad_bytes = threading.local()


def _note_undecodable(error: UnicodeDecodeError) -> tuple[str, int]:
    _bad_bytes.found.append(_bad_bytes.offset + error.start)
    return "", error.end


codecs.register_error("landing_files.note_undecodable", _note_undecodable)


def _undecodable_bytes(block: LineBlock) -> np.ndarray:
    """Offsets of the bytes of a block that are not UTF-8, from decodes in C of about 1 MiB of
    whole lines at a time (Python runs once per bad byte run, not once per line: 0.7 s less on a
    405k-line block with a few bad lines; the whole block at once held its text, up to 4x its
    bytes, and raised raw_customers' peak at 2M customers from about 1,000 to 1,047 MB)."""
    _bad_bytes.found = []
    view = memoryview(block.data)
    lines_before = np.searchsorted(block.ends, np.arange(DECODE_PIECE_BYTES, len(view), DECODE_PIECE_BYTES), side="right")
    bounds = np.unique(np.concatenate(([0], block.ends[lines_before[lines_before > 0] - 1], [len(view)]))).tolist()
    for start, end in zip(bounds, bounds[1:]):  # at line ends: no character is cut in two
        _bad_bytes.offset = start
        str(view[start:end], "utf-8", "landing_files.note_undecodable")
    return np.array(_bad_bytes.found, dtype=np.int64)


def _restore_cr(fields: list[str] | None) -> list[str] | None:
    if fields is None:
        return None
    return [f.replace(CR_STAND_IN, "\r") if CR_STAND_IN in f else f for f in fields]


def _missing_if_blank(value: str) -> str | None:
    """In CSV every value is text and an empty field is how a missing value is written: an empty or
    whitespace-only field is missing (NULL). Other values are kept exactly as written."""
    return value if value.strip() else None


def _blank(text: pa.Array) -> pa.Array:
    """_missing_if_blank's test on Arrow text: empty once Python's whitespace is trimmed."""
    return pc.equal(pc.utf8_trim(text, characters=PY_WHITESPACE), "")


def _widths_and_blanks(text: pa.Array, delimiter: str) -> tuple[pa.Array, pa.Array]:
    """Each simple line's number of fields (without splitting it yet) and whether the csv module
    reads it as a blank record: one field, whitespace only."""
    widths = pc.add(pc.count_substring(text, delimiter), 1)
    one_field = pc.equal(widths, 1)
    return widths, (pc.and_(one_field, _blank(text)) if pc.any(one_field).as_py() else one_field)


class CsvColumns:
    """The well-formed records of a file as Arrow columns (line_no, raw_record, the source's
    fields), gathered in file order from the csv module's records and blocks of simple lines.

    With a `sink`, every SINK_ROWS gathered rows go to it as one table (in file order), so the
    parse holds a part of the file's rows, not all of them; `table()` gives what is left."""

    def __init__(self, source: Source, delimiter: str, sink: Callable[[pa.Table], None] | None = None):
        self.names = ["line_no", "raw_record", *source.fields.values()]
        self.schema = pa.schema([(name, pa.int64() if name == "line_no" else pa.string()) for name in self.names])
        self.delimiter = delimiter
        self.sink = sink
        self.parts: list[pa.Table] = []
        self.pending: dict[str, list] = {name: [] for name in self.names}

    def _hand_over(self) -> None:
        if self.sink is not None and sum(part.num_rows for part in self.parts) >= SINK_ROWS:
            self.sink(self._gathered())
            self.parts = []

    def add_record(self, line_no: int, raw: str, fields: list[str], header: CsvHeader) -> None:
        if len(self.pending["line_no"]) >= SINK_ROWS:
            self._flush()
        self.pending["line_no"].append(line_no)
        self.pending["raw_record"].append(raw)
        for column, position in header.positions.items():
            self.pending[column].append(_missing_if_blank(fields[position]))

    def add_simple(self, lines: pa.Table, header: CsvHeader, problems: list[tuple[int, str, str]]) -> int:
        """A block of simple lines after the header (refused ones to `problems`); returns how
        many of its lines were blank."""
        self._flush()
        widths, blank = _widths_and_blanks(lines["line"], self.delimiter)
        blank_lines = int(pc.sum(blank).as_py() or 0)
        fits = pc.equal(widths, header.width)
        if blank_lines:
            kept = pc.invert(blank)
            lines, fits = lines.filter(kept), fits.filter(kept)
        if not pc.all(fits).as_py():
            wrong = lines.filter(pc.invert(fits))
            problems.extend(zip(wrong["line_no"].to_pylist(), ["wrong_column_count"] * len(wrong), wrong["line"].to_pylist()))
            lines = lines.filter(fits)
        fields = pc.split_pattern(lines["line"], self.delimiter)
        columns = {name: pa.nulls(len(lines), pa.string()) for name in self.names[2:]}
        for column, position in header.positions.items():
            value = pc.list_element(fields, position)
            columns[column] = pc.if_else(_blank(value), pa.scalar(None, pa.string()), value)
        self.parts.append(pa.table({"line_no": lines["line_no"], "raw_record": lines["line"], **columns}))
        self._hand_over()
        return blank_lines

    def _flush(self) -> None:
        if self.pending["line_no"]:
            self.parts.append(pa.table({name: pa.array(values, self.schema.field(name).type)
                                        for name, values in self.pending.items()}))
            self.pending = {name: [] for name in self.names}
            self._hand_over()

    def table(self) -> pa.Table:
        self._flush()
        return self._gathered()

    def _gathered(self) -> pa.Table:
        if not self.parts:
            return self.schema.empty_table()
        return pa.concat_tables([part.select(self.names).cast(self.schema) for part in self.parts])


def _parse_csv(source: Source, path: Path, records: CsvRecords, header: CsvHeader | None = None,
               header_only: bool = False, sink: Callable[[pa.Table], None] | None = None
               ) -> tuple[pa.Table | None, list[tuple], CsvHeader]:
    """Columns of the well-formed records (with a `sink`: those it has not been given), and the
    refused ones as (line, rule, raw text). `header`: the file's, for a shard that does not start
    the file; `header_only`: stop there."""
    columns = CsvColumns(source, records.delimiter, sink)
    problems: list[tuple[int, str, str]] = []
    records.width = header.width if header is not None else None
    for item in records:
        if isinstance(item, pa.Table):
            if header is None:
                header, item = _header_of_simple(source, path, item, records)
                if header is None:
                    continue
                if header_only:
                    return None, problems, header
            records.blank_lines += columns.add_simple(item, header, problems)
            continue
        line_no, fields, raw, problem = item
        if header is None:
            if fields is None:
                raise LandingFileError(source.name, path, f"unreadable header on line {line_no} ({problem})")
            header = match_header(source, path, fields, records.delimiter)
            records.header_end, records.width = records.last_line, header.width
            if header_only:
                return None, problems, header
            continue
        if problem is None and len(fields) != header.width:
            problem = "wrong_column_count"
        if problem is not None:
            problems.append((line_no, problem, raw))
            continue
        columns.add_record(line_no, raw, fields, header)
    if header is None:
        raise LandingFileError(source.name, path, "no header and no records: the file holds only whitespace")
    problems.extend((line_no, "bad_encoding", text) for line_no, text in records.undecodable)
    return columns.table(), problems, header


def _header_of_simple(source: Source, path: Path, lines: pa.Table, records: CsvRecords
                      ) -> tuple[CsvHeader | None, pa.Table]:
    """The header from the first non-blank line of a block of simple lines (the blank lines before
    it counted), and the lines after it; no header if every line is blank."""
    text = lines["line"]
    blank = _widths_and_blanks(text, records.delimiter)[1].to_numpy(zero_copy_only=False)
    first = int(np.argmin(blank)) if not blank.all() else len(blank)
    header_line = lines["line_no"][first].as_py() if first < len(blank) else None
    if records.undecodable and (header_line is None or records.undecodable[0][0] < header_line):
        raise LandingFileError(source.name, path, f"unreadable header on line {records.undecodable[0][0]} (bad_encoding)")
    records.blank_lines += first
    if header_line is None:
        return None, lines.slice(len(blank))
    header = match_header(source, path, text[first].as_py().split(records.delimiter), records.delimiter)
    records.header_end, records.width = header_line, header.width
    return header, lines.slice(first + 1)


@dataclass(frozen=True)
class CsvShard:
    """One shard of a plain CSV file cut after LFs (assets/ingest/file_shards.py): the records that
    start on the lines of bytes [start, end), numbered from 1 at `start`, after the first `skip`
    of them (the end of a record that started in the shard before); the last is read to its end
    past `end`. `header`: the file's, for a shard after the one at 0 (which reads it)."""

    start: int
    end: int
    skip: int = 0
    header: CsvHeader | None = None


def read_csv_header(source: Source, path: Path) -> tuple[CsvHeader, int]:
    """A CSV file's header and the line its record ends on, read (and refused) as the whole file's
    read does."""
    with open_text_bytes(source.name, path, encoding=source.encoding) as (stream, _):
        records = CsvRecords(LineReader(source.name, path, stream), sniff_delimiter(stream.peek(READ_BLOCK_BYTES), source))
        _, _, header = _parse_csv(source, path, records, header_only=True)
    return header, records.header_end


def stage_csv(con: duckdb.DuckDBPyConnection, path: Path, source: Source, shard: CsvShard | None = None) -> Staged:
    """A CSV file (or one shard of it) -> stg_<table> (text columns by header name) and unparseable
    records. A shard's notes say which lines it took: `range_lines` in its byte range, `end_line`
    where its last record ended (past the range when a quoted field runs on)."""
    table = source.tables[0]
    _create_work_tables(con)
    stop_line = byte_range = None
    if shard is not None:
        stop_line = count_lines(path, shard.start, shard.end)
        byte_range = (offset_after_lines(path, shard.start, shard.skip), shard.end, SEEK_BYTES)
    with open_text_bytes(source.name, path, byte_range, source.encoding) as (stream, notes):
        reader = LineReader(source.name, path, stream, detect_line_ending=shard is None)
        reader.lines_read = shard.skip if shard else 0
        header = shard.header if shard else None
        delimiter = header.delimiter if header else sniff_delimiter(stream.peek(READ_BLOCK_BYTES), source)
        records = CsvRecords(reader, delimiter, stop_line=stop_line)
        staged = StagedCsvRows(con, table)
        rest, problems, header = _parse_csv(source, path, records, header, sink=staged)
        staged(rest)
    too_long = [(n, text) for n, text in reader.too_long if n <= records.last_line]
    notes.update(reader.notes, blank_lines=records.blank_lines, delimiter=header.delimiter,
                 ignored_columns=header.ignored or None)
    if shard is not None:
        end_line = max(records.last_line, stop_line)
        notes.update(range_lines=stop_line, end_line=end_line, physical_lines=end_line - shard.skip)
    _add_unparseable(con, [(line_no, rule, None, raw) for line_no, rule, raw in problems]
                     + [(line_no, "line_too_long", None, text) for line_no, text in too_long])
    return Staged({table.name: staged.rows + len(problems) + len(too_long)}, notes)


class StagedCsvRows:
    """stg_<table> filled part after part as the parse hands its rows over (CsvColumns' sink), each
    row numbered by its place among the file's well-formed records (row_id from 1)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, table: RawTable):
        self.con, self.table, self.rows = con, table, 0
        replaced = [f'{normalized(table, c, c)} AS "{c}"' for c in table.normalized]
        self.select = f"* REPLACE ({', '.join(replaced)})" if replaced else "*"
        self.created = False

    def __call__(self, part: pa.Table) -> None:
        if self.created and not part.num_rows:
            return
        numbered = part.add_column(0, "row_id", pa.array(np.arange(self.rows + 1, self.rows + part.num_rows + 1,
                                                                   dtype=np.int64)))
        create_from_arrow(self.con, f"stg_{self.table.name}", numbered, self.select, append=self.created)
        self.created = True
        self.rows += part.num_rows


def create_from_arrow(con: duckdb.DuckDBPyConnection, name: str, data: pa.Table | pa.RecordBatchReader,
                      select: str = "*", append: bool = False) -> None:
    """A temp table from Arrow data, or (`append`) its rows added to it (`name` and `select` are
    SQL from code)."""
    con.register("arrow_input", data)
    try:
        into = f"INSERT INTO {name}" if append else f"CREATE OR REPLACE TEMP TABLE {name} AS"
        con.execute(f"{into} SELECT {select} FROM arrow_input")
    finally:
        con.unregister("arrow_input")


# ---------------------------------------------------------------------------------------------
# JSON Lines
# ---------------------------------------------------------------------------------------------

LINES_SCHEMA = pa.schema([("line_no", pa.int64()), ("line", pa.string())])


class JsonLineBatches:
    """Arrow batches (line_no, line) of the decodable lines of a file, streamed block by block so
    that DuckDB parses one block while the next is read; undecodable lines are kept aside."""

    def __init__(self, reader: LineReader):
        self.reader = reader
        self.undecodable: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        for block in self.reader.blocks():
            numbers, text = decodable_lines(block, self.reader.terminator, self.undecodable)
            yield pa.RecordBatch.from_arrays([pa.array(numbers), text], schema=LINES_SCHEMA)

    def reader_of_batches(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(LINES_SCHEMA, iter(self))


def _json_text(column: str, numeric_strings: bool) -> str:
    """SQL of a JSON value kept as its token text (12.5, "12.5", true): a string is not a number
    unless the source allows numeric strings, then a string's content stands for itself."""
    if numeric_strings:
        return f"CASE WHEN json_type({column}) = 'VARCHAR' THEN {column} ->> '$' ELSE {column}::VARCHAR END"
    return f"{column}::VARCHAR"


def stage_customers(con: duckdb.DuckDBPyConnection, path: Path, source: Source,
                    byte_range: tuple[int, int] | None = None) -> Staged:
    """JSON Lines: parsed once per line while reading; a line that is not a JSON object is kept
    whole for the quarantine. The items of valid customers are staged after their validation.

    `byte_range`: one shard of an LF-terminated file (its lines numbered from 1; a shard may hold
    no record: only the whole file must hold one)."""
    _create_work_tables(con)
    with open_text_bytes(source.name, path, byte_range, source.encoding) as (stream, notes):
        reader = LineReader(source.name, path, stream, detect_line_ending=byte_range is None,
                            block_bytes=JSON_BLOCK_BYTES)
        batches = JsonLineBatches(reader)
        # One JSON parse per line; `try` turns a malformed line into NULL instead of an error.
        # Anchored regexes, not trim(): a trim copies every line (measured 1.5x the whole read).
        create_from_arrow(con, "json_lines", batches.reader_of_batches(), f"""line_no,
            NOT regexp_matches(line, '[^{JSON_WHITESPACE}]') AS blank,
            CASE WHEN regexp_matches(line, '^[{JSON_WHITESPACE}]*[{{]')
                 THEN try(json_transform(line, '{CUSTOMER_JSON_SHAPE}')) END AS parsed,
            CASE WHEN parsed IS NULL AND NOT blank THEN rtrim(line, chr(10) || chr(13)) END AS malformed""")
    blank = int(fetch_scalar(con, "SELECT count(*) FROM json_lines WHERE blank"))
    records = reader.lines_read - blank
    if records == 0 and byte_range is None:
        raise LandingFileError(source.name, path, NO_RECORDS)
    _add_unparseable(con, [(n, "bad_encoding", None, t) for n, t in batches.undecodable]
                     + [(n, "line_too_long", None, t) for n, t in reader.too_long])
    con.execute("INSERT INTO unparseable SELECT line_no, 'malformed_json', NULL, malformed FROM json_lines "
                "WHERE malformed IS NOT NULL")
    customers = source.tables[0]
    con.execute(f"""CREATE OR REPLACE TEMP TABLE stg_customers AS
        SELECT line_no AS row_id, line_no, {normalized(customers, 'customer_id', 'parsed.id')} AS customer_id,
               parsed.email AS email, parsed.createdAt AS created_at,
               len(parsed.purchaseHistory) AS purchase_count
        FROM json_lines WHERE parsed IS NOT NULL""")
    notes.update(reader.notes, blank_lines=blank)
    return Staged({customers.name: records}, notes)


def normalized(table: RawTable, column: str, sql: str) -> str:
    """SQL of a staged value as the rules judge it and as it lands (the registry's `normalized`)."""
    expression = table.normalized.get(column)
    return expression.replace("{value}", f"({sql})") if expression else sql


def stage_customer_purchases(con: duckdb.DuckDBPyConnection, table: RawTable, source: Source) -> int:
    """The purchase items of the customers that passed their own rules, one row per item.

    row_id packs (line, position): an 8 MB line cannot hold 2^20 items, so ids never collide.
    (unnest in the select list: a lateral `unnest(...) WITH ORDINALITY` measured 7x slower.)"""
    amount = _json_text("item.amount", source.numeric_strings)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE stg_customer_purchases AS
        SELECT (line_no << 20) + position AS row_id, line_no, (position - 1)::INTEGER AS item_no,
               customer_id, item.productId AS product_id, {amount} AS amount, item.date AS purchased_at
        FROM (SELECT j.line_no, c.customer_id, unnest(j.parsed.purchaseHistory) AS item,
                     generate_subscripts(j.parsed.purchaseHistory, 1) AS position
              FROM json_lines AS j JOIN stg_customers AS c USING (line_no)
              WHERE c.row_id NOT IN (SELECT row_id FROM failures_customers))""")
    # The parsed lines are not read again: their blocks (on disk at 20M customers: the staging
    # spills) are free for the items' validation and the write.
    con.execute("DROP TABLE json_lines")
    return int(fetch_scalar(con, "SELECT count(*) FROM stg_customer_purchases"))


def line_texts(source: Source, path: Path, wanted: np.ndarray,
               block_bytes: int | None = RESCAN_BLOCK_BYTES) -> list[tuple[int, str]]:
    """The text of some lines of a file (sorted line numbers), read again: only the quarantined
    records' raw text is needed, and keeping every line while parsing would hold the whole file."""
    found: list[tuple[int, str]] = []
    with open_text_bytes(source.name, path, encoding=source.encoding) as (stream, _):
        reader = LineReader(source.name, path, stream, block_bytes=block_bytes)
        for block in reader.blocks():
            last = block.first_line + len(block.ends) - 1
            low, high = np.searchsorted(wanted, [block.first_line, last + 1])
            for line_no in wanted[low:high]:
                text = block.text_of(int(line_no) - block.first_line, reader.terminator)
                found.append((int(line_no), text.decode("utf-8", "replace")))
            if high == len(wanted):
                break
    return found


# ---------------------------------------------------------------------------------------------
# Readers by format, and the order in which a file's tables are staged and judged
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reader:
    """How a file format is staged: its records, then the parts of the valid ones (if any)."""

    stage: Callable[[duckdb.DuckDBPyConnection, Path, Source], Staged]
    stage_part: Callable[[duckdb.DuckDBPyConnection, RawTable, Source], int] | None = None


READERS = {"csv": Reader(stage_csv), "customer_jsonl": Reader(stage_customers, stage_customer_purchases)}


def stage_and_judge(con: duckdb.DuckDBPyConnection, source: Source, day: str, path: Path,
                    byte_range: tuple[int, int] | CsvShard | None = None, across_rows: bool | None = None) -> Staged:
    """A file (or one shard of it: `byte_range`, a CsvShard for CSV) staged and judged table by table: its records,
    then the parts of the records that passed (a customer's purchase items). `across_rows`: which
    rules (assets/validate/rules.py `quarantine`; a shard applies the one-record rules)."""
    reader = READERS[source.reader]
    staged = reader.stage(con, path, source) if byte_range is None else reader.stage(con, path, source, byte_range)
    validate_staged(con, source.tables[0], day, source.naive_timezone, across_rows, source.timestamp_format)
    for part in source.tables[1:]:
        staged.inputs[part.name] = reader.stage_part(con, part, source)
        validate_staged(con, part, day, source.naive_timezone, across_rows, source.timestamp_format)
    return staged
