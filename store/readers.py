"""Streaming readers: turn one data file into (line, byte_offset, record, error) items.

Memory stays flat whatever the file size: JSONL and CSV are read a line at a time, a
whole-file JSON array is decoded a record at a time from a bounded window, text is chunked.
`record` is a parsed object (a dict for well-formed input) or None with `error` saying why.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from evertune.store.errors import IngestError

Item = tuple[int | None, int | None, Any, str | None]

SNIFF_BYTES = 8192
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
SUPPORTED = ".jsonl .ndjson .json .csv .tsv .txt .md"
BOM = codecs.BOM_UTF8


def detect_format(path: Path, head: bytes) -> str:
    """jsonl, json-array, csv, tsv or text; raise IngestError for files we cannot read."""
    if not head.strip():
        raise IngestError("empty file: no records")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise IngestError(f"binary file (NUL byte at offset {nul}); expected UTF-8 text")
    suffix = path.suffix.lower()
    first = head.removeprefix(BOM).lstrip()[:1]
    if suffix in JSON_SUFFIXES:
        # JSON lines whatever the first line holds: a .jsonl whose first line was an
        # array was read as one array, and the 500 lines after it were ignored
        return "json-array" if first == b"[" and suffix == ".json" else "jsonl"
    if suffix in CSV_SUFFIXES:
        return suffix[1:]
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise IngestError(f"unsupported file type '{suffix or path.name}' (supported: {SUPPORTED})")


def read_records(
    fmt: str, f: BinaryIO, *, max_record_bytes: int, chunk_chars: int
) -> Iterator[Item]:
    if fmt == "jsonl":
        return read_jsonl(f, max_record_bytes=max_record_bytes)
    if fmt == "json-array":
        return read_json_array(f, max_record_bytes=max_record_bytes)
    if fmt in ("csv", "tsv"):
        return read_csv(f, delimiter="," if fmt == "csv" else "\t")
    return read_text(f, chunk_chars=chunk_chars)


def _utf8_problem(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (invalid byte at column {exc.start + 1})"
    return None


def read_jsonl(f: BinaryIO, *, max_record_bytes: int) -> Iterator[Item]:
    """One record per line. A line longer than `max_record_bytes` is rejected without being
    held: it is read past in 1 MB pieces (a 50 MB line was held, decoded and parsed whole,
    4x its size in memory, for an example far over any example size limit)."""
    offset = 0
    loads = orjson.loads
    line_no = 0
    while raw := f.readline(max_record_bytes + 1):
        line_no += 1
        start = offset
        offset += len(raw)
        if len(raw) > max_record_bytes and not raw.endswith(b"\n"):
            size = len(raw)
            del raw
            while piece := f.readline(1 << 20):
                size += len(piece)
                if piece.endswith(b"\n"):
                    break
            offset = start + size
            yield (
                line_no,
                start,
                None,
                f"record too large: {size:,} bytes on one line (at most {max_record_bytes:,})",
            )
            continue
        if line_no == 1 and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        try:
            yield line_no, start, loads(raw), None
        except orjson.JSONDecodeError as exc:
            if not raw.strip():
                continue  # blank lines are layout, not records
            reason = _utf8_problem(raw) or f"bad JSON: {exc.msg} (column {exc.colno})"
            if not raw.endswith(b"\n"):
                reason += " (the last line is incomplete: was the file cut short?)"
            yield line_no, start, None, reason


def read_json_array(f: BinaryIO, *, max_record_bytes: int, chunk: int = 1 << 20) -> Iterator[Item]:
    """Decode `[rec, rec, ...]` one record at a time; a truncated file keeps what came before."""
    decoder = json.JSONDecoder()
    # Bytes that are not UTF-8 become lone surrogates (U+DC80-U+DCFF, which no UTF-8 text
    # decodes to), so the array reads on and only the record holding them is rejected:
    # before, one bad byte 4.6 MB into a 200k-record array lost every record after it.
    text_decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buf, pos, eof = "", 0, False
    # A cursor (index in buf, its line, its byte offset in the file) moved forward only, so
    # counting lines and bytes costs O(file) in all, not O(window) per record.
    cur, cur_line, cur_off = 0, 1, 0

    def where(i: int) -> tuple[int, int]:
        nonlocal cur, cur_line, cur_off
        seg = buf[cur:i]
        cur_line += seg.count("\n")
        cur_off += len(seg.encode("utf-8", "surrogateescape"))
        cur = i
        return cur_line, cur_off

    def refill() -> bool:
        nonlocal buf, pos, eof, cur
        if eof:
            return False
        where(pos)  # drop what was consumed; the cursor keeps its line and offset
        data = f.read(chunk)
        eof = not data
        buf = buf[pos:] + text_decoder.decode(data, final=eof)
        pos = cur = 0
        return not eof or bool(buf)

    def skip_ws() -> bool:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf):
                return True
            if not refill():
                return False

    refill()
    skip_ws()
    pos += 1  # the '[' that detect_format saw
    index = 0
    while True:
        if not skip_ws():
            line, off = where(pos)
            yield (
                line,
                off,
                None,
                (
                    f"truncated JSON array: the file ends after record {index} without the"
                    " closing ']' (every complete record before was kept)"
                ),
            )
            return
        if buf[pos] == "]":
            return
        if index:
            if buf[pos] != ",":
                line, off = where(pos)
                yield line, off, None, f"bad JSON: expected ',' or ']' after record {index}"
                return
            pos += 1
            if not skip_ws():
                continue
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                break
            except RecursionError:
                line, off = where(pos)
                yield line, off, None, f"bad JSON in record {index + 1}: nested too deeply"
                return
            except json.JSONDecodeError as exc:
                # Incomplete in this window, or really malformed: read on, within limits.
                if len(buf) - pos < max_record_bytes and refill():
                    continue
                line, off = where(pos)
                if eof and _cut_off(buf, exc):
                    msg = (
                        f"truncated JSON array: record {index + 1} is cut off at the end"
                        " of the file (every complete record before it was kept)"
                    )
                else:
                    msg = (
                        f"bad JSON in record {index + 1}: {exc.msg} (reading stopped here:"
                        " the records after it were not read)"
                    )
                yield line, off, None, msg
                return
        line, off = where(pos)
        index += 1
        bad = _NOT_UTF8.search(buf, pos, end)
        if bad:
            near = off + len(buf[pos : bad.start()].encode("utf-8", "surrogateescape"))
            yield line, off, None, f"not UTF-8 (invalid byte at byte offset {near})"
        else:
            yield line, off, record, None
        pos = end


_JSON_STRUCTURE = frozenset('{}[],:"')
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a bad byte


def _cut_off(buf: str, exc: json.JSONDecodeError) -> bool:
    """At the end of the file: was the failing record cut short, or is it malformed?

    Cut short, the decoder runs out of text: nothing structural follows the error (or the
    file ends inside a string). Malformed, the rest of the file follows the error."""
    return exc.msg.startswith("Unterminated string") or not _JSON_STRUCTURE.intersection(
        buf[exc.pos :]
    )


def _decoded_lines(f: BinaryIO, bad: set[int]) -> Iterator[str]:
    for line_no, raw in enumerate(f, 1):
        if line_no == 1:
            raw = raw.removeprefix(BOM)
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.add(line_no)
            yield raw.decode("utf-8", errors="replace")


def read_csv(f: BinaryIO, *, delimiter: str) -> Iterator[Item]:
    """Rows as dicts by header column; every row accounted for.

    A quote that is never closed would make the csv module read the rest of the file as
    one field (measured: the 1,000 rows after it became one 9,804-character example, 0
    rejected). The reader is strict, so that raises at the end of the file; the row where
    the quote opened is then reported and the lines after it are read again as rows."""
    bad: set[int] = set()
    pending: list[str] = []  # the lines read since the current row began

    def recorded(lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            pending.append(line)
            yield line

    lines: Iterator[str] = _decoded_lines(f, bad)
    reader = csv.reader(recorded(lines), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        yield 1, 0, None, _csv_problem(exc)
        return
    if not header:
        yield 1, 0, None, "CSV file has no header row"
        return
    columns = [h.strip().lower() for h in header]
    known = {"prompt", "completion", "question", "answer", "instruction", "output", "text"}
    if not known & set(columns):
        yield (
            1,
            0,
            None,
            (
                f"CSV header has no usable columns (found: {', '.join(columns)}); expected"
                " prompt,completion or question,answer (optionally system), or"
                " instruction,input,output, or text"
            ),
        )
        return
    base = 0  # lines before the current reader's first line
    start = reader.line_num + 1
    pending.clear()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            line = start
            if str(exc) == "unexpected end of data":  # a quote never closed
                yield (
                    line,
                    None,
                    None,
                    "bad CSV: a quote opened in this row is never closed (the rest of the"
                    " file would be one field); the rows after it were read on their own",
                )
                rest, base = pending[1:], line  # line `line` is pending[0]
                pending.clear()
                reader = csv.reader(recorded(iter(rest)), delimiter=delimiter, strict=True)
                start = base + 1
                continue
            # the reader resets and goes on with the next line
            start = base + reader.line_num + 1
            pending.clear()
            yield line, None, None, _csv_problem(exc)
            continue
        end = base + reader.line_num
        line, start = start, end + 1
        pending.clear()
        if not row:  # a blank line; a row of empty cells is reported below, not skipped
            continue
        if bad and any(n in bad for n in range(line, end + 1)):
            yield line, None, None, "not UTF-8 (invalid bytes in this row)"
        elif len(row) != len(columns):
            yield line, None, None, f"row has {len(row)} fields, the header has {len(columns)}"
        else:
            yield line, None, dict(zip(columns, row, strict=True)), None


def _csv_problem(exc: csv.Error) -> str:
    if "new-line character" in str(exc):
        return (
            "bad CSV: a carriage return (\\r) inside an unquoted field; quote the field, or"
            " save the file with \\n or \\r\\n line endings"
        )
    return f"bad CSV: {exc}"


def read_text(f: BinaryIO, *, chunk_chars: int) -> Iterator[Item]:
    """Continued pre-training text: paragraphs packed into chunks of at most chunk_chars."""
    parts: list[str] = []
    size, first_line, first_offset, offset = 0, 1, 0, 0

    def flush() -> Iterator[Item]:
        nonlocal parts, size
        if parts and "".join(parts).strip():
            yield first_line, first_offset, {"text": "".join(parts).strip("\n")}, None
        parts, size = [], 0

    for line_no, raw in enumerate(f, 1):
        start, offset = offset, offset + len(raw)
        if line_no == 1:
            raw = raw.removeprefix(BOM)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, start, None, f"not UTF-8 (invalid byte at column {exc.start + 1})"
            continue
        # Break at a paragraph boundary once the chunk is over half full, or anywhere when full.
        blank = not line.strip()
        if (blank and size >= chunk_chars // 2) or size + len(line) > chunk_chars:
            yield from flush()
        if len(line) > chunk_chars:  # one enormous line: hard split, by index (slicing
            # off the head each time copied the rest: a 50 MB line took 4 min 23 s)
            cut = len(line) - len(line) % chunk_chars
            for i in range(0, cut, chunk_chars):
                parts, size, first_line, first_offset = (
                    [line[i : i + chunk_chars]],
                    chunk_chars,
                    line_no,
                    start,
                )
                yield from flush()
            line = line[cut:]
        if not parts:
            if blank:
                continue
            first_line, first_offset = line_no, start
        parts.append(line)
        size += len(line)
    yield from flush()
