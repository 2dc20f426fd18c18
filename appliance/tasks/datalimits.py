"""Bounded reading of uploaded files for the data tasks: no input can make a task hold more than
its limits in memory.

A file is read line by line with `readline(limit)`, so a file without newlines costs one
record's bound ([queue] data_max_record_bytes), not its size. CSV rows are parsed from those
lines with the csv module's field limit at [queue] csv_max_field_bytes, and a row wider than
[queue] csv_max_columns ends the task (csv_profile keeps state per column: a 1 MB line of
commas used to cost about 0.5 GB). Each breach raises LimitExceeded, which fails the task with
error code `limit_exceeded` and a message naming the setting.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterable, Iterator
from typing import Any


class LimitExceeded(ValueError):
    """Input past one of the data tasks' limits; the message names the setting."""

    code = "limit_exceeded"

    def __init__(self, what: str, limit: int, setting: str):
        super().__init__(f"{what} (the limit is {limit}: [{setting.replace('.', '] ', 1)})")
        self.limit = limit
        self.setting = setting


def bounded_lines(fh: Any, max_bytes: int, seen: list[int] | None = None) -> Iterator[bytes]:
    """The lines of a binary file, each at most `max_bytes` (LimitExceeded beyond); `seen[0]` counts bytes read."""
    while True:
        raw = fh.readline(max_bytes + 1)
        if not raw:
            return
        if len(raw) > max_bytes:
            raise LimitExceeded(f"a line is longer than {max_bytes} bytes", max_bytes, "queue.data_max_record_bytes")
        if seen is not None:
            seen[0] += len(raw)
        yield raw


_field_limit_lock = threading.Lock()


def _set_field_limit(limit: int) -> None:
    # csv's field limit is one value per process: every task of a worker sets the same config value
    with _field_limit_lock:
        if csv.field_size_limit() != limit:
            csv.field_size_limit(limit)


def csv_rows(lines: Iterable[str], cfg: Any, delimiter: str = ",", max_columns: int | None = None) -> Iterator[list[str]]:
    """csv.reader over `lines` with the field cap of `cfg`, and a column cap (None: [queue] csv_max_columns)."""
    field_limit = cfg.queue.csv_max_field_bytes
    columns = cfg.queue.csv_max_columns if max_columns is None else max_columns
    _set_field_limit(field_limit)
    reader = csv.reader(lines, delimiter=delimiter)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise LimitExceeded(f"a CSV field is larger than {field_limit} bytes", field_limit, "queue.csv_max_field_bytes") from None
            raise ValueError(f"the CSV file cannot be read at line {reader.line_num}: {exc}") from None
        if len(row) > columns:
            raise LimitExceeded(f"CSV line {reader.line_num} has {len(row)} columns, more than {columns}", columns, "queue.csv_max_columns")
        yield row


def csv_dicts(lines: Iterable[str], cfg: Any) -> Iterator[dict[str, Any]]:
    """Rows of a CSV file with a header as dicts (what csv.DictReader gives), within the same caps."""
    rows = csv_rows(lines, cfg)
    header = next(rows, None)
    if header is None:
        return
    width = len(header)
    for row in rows:
        if not row:
            continue
        record: dict[str, Any] = dict(zip(header, row, strict=False))
        if len(row) < width:
            record.update(dict.fromkeys(header[len(row) :]))
        elif len(row) > width:
            record["_extra"] = row[width:]  # csv.DictReader's None key could not be stored as JSON
        yield record
