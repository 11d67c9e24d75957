"""What the subcommands share: :class:`UsageError` (a mistake of the user's, reported as one line) and the
check that an output path can be written before any work starts."""

from __future__ import annotations

import os
from pathlib import Path


class UsageError(ValueError):
    """A mistake in a command line or in what it names (data, a run folder, a checkpoint): the command's ``main``
    prints it as one line ``fastmsc COMMAND: error: ...`` and exits with status 2, as argparse does."""


def check_writable(flag: str, path: Path) -> None:
    """Raise :class:`UsageError` unless ``path`` can be written: checked before training, so that a mistyped
    folder fails at once with one line rather than after the first epoch with a traceback. The missing folders
    of the path are created when it is written, so the nearest existing one must be a writable folder."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a folder, so the file cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {parent} is not writable")
