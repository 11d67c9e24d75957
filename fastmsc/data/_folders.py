"""Datasets on disk: a folder's NAME_TRAIN/NAME_TEST pair, and lookup by name in $FASTMSC_DATA and in the data
bundled with aeon or sktime."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ._formats import SUFFIXES, _classes_for, _parse, _to_series_data
from ._series import DataFormatError, SeriesData, znormalise_series


def split_files(directory, name: str | None = None) -> tuple[Path, Path]:
    """The (NAME_TRAIN, NAME_TEST) files (.ts or .tsv) in ``directory``.

    NAME defaults to the folder's name, else to the one dataset whose ``*_TRAIN`` file the folder holds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data folder {directory} does not exist")

    def pair(candidate):
        for suffix in SUFFIXES:
            train, test = directory / f"{candidate}_TRAIN{suffix}", directory / f"{candidate}_TEST{suffix}"
            if train.is_file() and test.is_file():
                return train, test
        return None

    if name:
        found = pair(name)
        if found is None:
            raise FileNotFoundError(f"data folder {directory} holds no {name}_TRAIN/{name}_TEST pair of .ts or "
                                    f".tsv files")
        return found
    found = pair(directory.name)
    if found is not None:
        return found
    present = sorted({p.name.rsplit("_TRAIN", 1)[0] for s in SUFFIXES for p in directory.glob(f"*_TRAIN{s}")})
    pairs = [pair(candidate) for candidate in present]
    pairs = [p for p in pairs if p is not None]
    if len(pairs) == 1:
        return pairs[0]
    if len(pairs) > 1:
        raise ValueError(f"data folder {directory} holds several datasets ({', '.join(present)}); name one")
    raise FileNotFoundError(f"data folder {directory} holds no NAME_TRAIN/NAME_TEST pair of .ts or .tsv files")


def load_split(directory, name: str | None = None, znormalise: bool = False) -> tuple[SeriesData, SeriesData]:
    """Load the train and test splits of a dataset folder with one class list for both.

    Labels map to 0..K-1 in the @classLabel order of the header (the train file's, else the test file's),
    or sorted (numerically when all labels are numbers) over both splits when no header declares them.
    """
    train_path, test_path = split_files(directory, name)
    raw_train, raw_test = _parse(train_path), _parse(test_path)
    channels = (len(raw_train.series[0]), len(raw_test.series[0]))
    if channels[0] != channels[1]:
        message = f"test series have {channels[1]} channel(s) but train series ({train_path.name}) have {channels[0]}"
        raise DataFormatError(test_path, raw_test.label_lines[0], message)
    classes = _classes_for([raw_train, raw_test])
    train, test = _to_series_data(raw_train, classes), _to_series_data(raw_test, classes)
    if znormalise:
        train, test = znormalise_series(train), znormalise_series(test)
    return train, test


def _search_roots() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("FASTMSC_DATA", "").split(os.pathsep) if p]
    for package in ("aeon", "sktime"):
        # find_spec on a top-level name locates the package without importing it (importing aeon or
        # sktime would cost seconds and pull in their dependencies).
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            roots.append(Path(location) / "datasets" / "data")
    return roots


def find_dataset(name: str) -> Path:
    """The folder holding NAME_TRAIN/NAME_TEST: searched in each folder of $FASTMSC_DATA (as ``DIR/NAME`` and
    ``DIR``), then in the bundled data of an installed aeon, then sktime."""
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"dataset name must be a bare name like 'GunPoint', got {name!r}; use --data for a folder")
    searched = []
    for root in _search_roots():
        for directory in (root / name, root):
            searched.append(str(directory))
            if any((directory / f"{name}_TRAIN{s}").is_file() for s in SUFFIXES):
                return directory
    where = "; ".join(searched) or "nowhere: $FASTMSC_DATA is unset and neither aeon nor sktime is installed"
    raise FileNotFoundError(f"dataset {name!r} not found. Searched: {where}. Set FASTMSC_DATA to a folder holding "
                            f"{name}/{name}_TRAIN.ts, or pass --data DIR")


def load_dataset(name: str, znormalise: bool = False) -> tuple[SeriesData, SeriesData]:
    """:func:`load_split` of the folder :func:`find_dataset` finds for ``name``."""
    return load_split(find_dataset(name), name, znormalise)
