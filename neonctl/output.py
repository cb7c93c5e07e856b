"""Rendering command results as a table (for people), JSON or YAML (for scripts).

Commands build plain rows (dicts); this module is the only place that formats
them. JSON/YAML carry every field; tables show the curated columns with Title
Case headers. Diagnostics never come through here: they go to stderr.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Any


class Format(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0].keys())
    headers = [c.replace("_", " ").title() for c in columns]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=False)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def emit(data: Any, fmt: Format = Format.table, columns: list[str] | None = None) -> None:
    """Print `data` (a row, a list of rows, or a dict of sections) in the chosen format."""
    if fmt == Format.json:
        print(json.dumps(data, indent=2, default=str))
    elif fmt == Format.yaml:
        import yaml  # noqa: PLC0415 - loaded on use: CLI start-up

        print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False).rstrip())
    elif isinstance(data, list):
        print(table(data, columns))
    elif isinstance(data, dict) and all(isinstance(v, (list, dict)) for v in data.values()) and data:
        for i, (section, value) in enumerate(data.items()):
            if i:
                print()
            print(f"{section.replace('_', ' ').title()}:")
            print(table(value if isinstance(value, list) else [value]))
    else:
        print(table([data], columns))


def info(msg: str) -> None:
    print(msg, file=sys.stderr)
