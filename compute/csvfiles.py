"""Reading the small CSV inputs users hand to commands (labels, classes, groups), with one-line errors."""
from __future__ import annotations

import csv
from pathlib import Path

from compute.errors import AtlasError


def read_csv_rows(path: str | Path, columns: tuple[str, ...], what: str, allow_empty: bool = False) -> list[dict]:
    """The rows of a CSV with a header naming at least `columns`; every row must give each of them a value.

    `what` names the file in messages ("labels", "classes"). A row cut short (a stray carriage return or a
    missing comma) is an error with its line number, not a None that fails later."""
    path = Path(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if not allow_empty or header:
                missing = [c for c in columns if c not in header]
                if missing:
                    raise AtlasError(f"{what} file {path} needs the columns {','.join(columns)} "
                                     f"(its header has {','.join(header) or 'nothing'})")
            for row in reader:
                short = [c for c in columns if row.get(c) is None]
                if short:
                    raise AtlasError(f"{what} file {path}, line {reader.line_num}: no value for "
                                     f"{','.join(short)} (a missing comma or a line break inside a field?)")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise AtlasError(f"cannot read {what} file {path}: {str(e).splitlines()[0]}") from None
    if not rows and not allow_empty:
        raise AtlasError(f"{what} file {path} has no rows")
    return rows
