"""Files written whole or not at all: a reader, or a run killed mid-write, never sees half a file.

Used for metrics, checkpoints and the dispatch table; the writers take any path-like and create its folder.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
from pathlib import Path


def replace_atomically(path, write) -> None:
    """Write ``path`` as ``write(tmp)`` into a temporary file renamed over it: a reader (or a run killed
    mid-write) never sees half a file.

    The temporary file (``NAME.<pid>.<random>.tmp`` beside ``path``) is unique per process and call, so
    concurrent writers of one path do not collide: each rename is whole and the last one wins. It is created
    empty, with the permissions of a new file (umask applied), and removed if ``write`` or the rename fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    """``obj`` as indented JSON."""
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def write_csv(path, columns, rows) -> None:
    """One line per row (dicts); missing and None values are written as empty fields."""
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})

    replace_atomically(path, write)
