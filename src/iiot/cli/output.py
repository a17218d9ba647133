"""Command output: an aligned table for people, `--json` for scripts."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["add_json_flag", "iso_time", "print_record", "print_rows"]


def add_json_flag(parser: Any) -> None:
    """Add `--json` to a listing or showing command."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def iso_time(ms: int | None) -> str | None:
    """Unix milliseconds as an ISO 8601 UTC time (to the second)."""
    if ms is None:
        return None
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    """Rows as a table with a header line (or a JSON array)."""
    if as_json:
        print(json.dumps(list(rows), indent=2, default=str))
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    header = [c.upper().replace("_", " ") for c in columns]
    for line in [header, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")


def print_record(record: dict[str, Any], as_json: bool) -> None:
    """One object as `field: value` lines (or a JSON object)."""
    if as_json:
        print(json.dumps(record, indent=2, default=str))
        return
    width = max(len(k) for k in record)
    for key, value in record.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for sub_key, sub_value in value.items():
                print(f"  {sub_key}: {_cell(sub_value)}")
        else:
            print(f"{key.ljust(width)}  {_cell(value)}")
