"""Reading UCR/UEA ``.ts`` and UCR ``.tsv`` files into :class:`SeriesData` (the rules are the package's
docstring's: trailing missing values are padding, malformed files raise :class:`DataFormatError`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._series import STORAGE_DTYPE, DataFormatError, SeriesData

SUFFIXES = (".ts", ".tsv")
_MISSING_TOKENS = {"?", "nan", "NaN", "NAN", ""}


def _parse_values(text: str, path, line_no: int, what: str) -> np.ndarray:
    """Comma-separated numbers (missing ones as NaN) -> float64 array; errors name the bad value, after the
    prefix ``what`` (e.g. 'channel 2, ')."""
    parts = text.split(",")
    cleaned = ["nan" if p.strip() in _MISSING_TOKENS else p for p in parts]
    try:
        values = np.array(cleaned, dtype=np.float64)
    except ValueError:
        for i, token in enumerate(cleaned):
            try:
                float(token)
            except ValueError:
                raise DataFormatError(path, line_no, f"{what}value {i + 1}: cannot read {token.strip()!r} "
                                                     f"as a number") from None
        raise
    if np.isinf(values).any():
        i = int(np.flatnonzero(np.isinf(values))[0])
        raise DataFormatError(path, line_no, f"{what}value {i + 1}: infinite value {parts[i].strip()!r}")
    with np.errstate(over="ignore"):
        overflow = np.isinf(values.astype(STORAGE_DTYPE))  # finite in float64, infinite once stored
    if overflow.any():
        i = int(np.flatnonzero(overflow)[0])
        limit = np.finfo(STORAGE_DTYPE)
        raise DataFormatError(path, line_no, f"{what}value {i + 1}: {parts[i].strip()!r} is beyond the range of "
                                             f"{limit.dtype.name} (|x| <= {limit.max:.4g}), the dtype the data are "
                                             f"stored and trained in")
    return values


def _series_length(channels: list[np.ndarray], path, line_no: int) -> int:
    """Valid length of one series (trailing missing values are padding); interior gaps are errors."""
    length = 0
    for values in channels:
        present = np.flatnonzero(~np.isnan(values))
        if present.size:
            length = max(length, int(present[-1]) + 1)
    if length == 0:
        raise DataFormatError(path, line_no, "the series has no values (all missing)")
    for c, values in enumerate(channels):
        if values.shape[0] < length:
            raise DataFormatError(path, line_no, f"channel {c + 1} has {values.shape[0]} values but another channel "
                                                 f"of this series has {length}; channels of a series must have "
                                                 f"equal length")
        gaps = np.flatnonzero(np.isnan(values[:length]))
        if gaps.size:
            raise DataFormatError(path, line_no, f"channel {c + 1}, value {int(gaps[0]) + 1}: missing value inside "
                                                 f"the series (only trailing missing values are accepted, as "
                                                 f"padding of a shorter series)")
    return length


def _normalise_label(token: str) -> str:
    """Numeric labels written as floats ('1.0000000e+00' in old UCR files) become '1'."""
    token = token.strip()
    try:
        value = float(token)
    except ValueError:
        return token
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return token


@dataclass
class _RawSplit:
    path: Path
    series: list[list[np.ndarray]]
    lengths: list[int]
    labels: list[str] | None  # None: an unlabelled file (read only for prediction)
    label_lines: list[int]  # the line of each series
    declared_classes: tuple[str, ...] | None
    name: str


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"not a UTF-8 text file ({exc})") from None


_TRUE_FALSE = {"true": True, "false": False}


def _header_bool(path, line_no, key, value) -> bool:
    if value.lower() not in _TRUE_FALSE:
        raise DataFormatError(path, line_no, f"@{key} must be 'true' or 'false', got {value!r}")
    return _TRUE_FALSE[value.lower()]


def _header_int(path, line_no, key, value) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise DataFormatError(path, line_no, f"@{key} must be a positive integer, got {value!r}")
    return number


def _parse_ts(path: Path, require_labels: bool = True) -> _RawSplit:
    """``require_labels=False`` also reads unlabelled files (``@classLabel false``: every field of a data line
    is a channel); their split has ``labels`` None."""
    header: dict[str, object] = {}
    declared_classes = None
    series, lengths, labels, label_lines = [], [], [], []
    in_data = False
    num_channels = None
    for line_no, raw in enumerate(_read_lines(path), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if in_data:
                raise DataFormatError(path, line_no, f"header line {line.split()[0]!r} after @data")
            key, _, value = line[1:].partition(" ")
            key, value = key.lower(), value.strip()
            if key == "data":
                if header.get("classlabel") is not True and not (header.get("classlabel") is False
                                                                 and not require_labels):
                    if "targetlabel" in header:
                        raise DataFormatError(path, line_no, "this is a regression problem (@targetLabel); "
                                                             "fastmsc trains classifiers and needs @classLabel true")
                    raise DataFormatError(path, line_no, "no '@classLabel true <labels...>' header before @data; "
                                                         "unlabelled series cannot train a classifier")
                in_data = True
            elif key == "classlabel":
                flag, _, rest = value.partition(" ")
                header[key] = _header_bool(path, line_no, key, flag)
                if header[key]:
                    declared_classes = tuple(rest.split())
                    if not declared_classes:
                        raise DataFormatError(path, line_no, "@classLabel true must be followed by the class labels")
                    if len(set(declared_classes)) != len(declared_classes):
                        raise DataFormatError(path, line_no, f"@classLabel lists a label twice: {declared_classes}")
            elif key in ("timestamps", "univariate", "equallength", "missing"):
                header[key] = _header_bool(path, line_no, key, value)
                if key == "timestamps" and header[key]:
                    raise DataFormatError(path, line_no, "time-stamped series (@timeStamps true) are not supported")
            elif key in ("dimension", "dimensions", "serieslength"):
                header["dimensions" if key.startswith("dimension") else key] = _header_int(path, line_no, key, value)
            else:  # @problemName, @targetLabel and headers of later format versions carry nothing we need
                header[key] = value
            continue
        if not in_data:
            raise DataFormatError(path, line_no, "data line before the @data header")
        fields = line.split(":")
        labelled = header.get("classlabel") is True
        if labelled:
            if len(fields) < 2:
                raise DataFormatError(path, line_no, "expected values then ':' then the class label, found no ':'")
            label = fields[-1].strip()
            if not label:
                raise DataFormatError(path, line_no, "the class label (after the last ':') is empty")
            if declared_classes is not None and label not in declared_classes:
                raise DataFormatError(path, line_no, f"class label {label!r} is not among the @classLabel labels "
                                                     f"{list(declared_classes)}")
            fields = fields[:-1]
        channels = [_parse_values(text, path, line_no, f"channel {c + 1}, ") for c, text in enumerate(fields)]
        if num_channels is None:
            num_channels = len(channels)
            expected = 1 if header.get("univariate") is True else header.get("dimensions")
            if expected is not None and num_channels != expected:
                source = "@univariate true" if header.get("univariate") is True else f"@dimensions {expected}"
                raise DataFormatError(path, line_no, f"expected {expected} channel(s) ({source}), found {num_channels}")
        elif len(channels) != num_channels:
            raise DataFormatError(path, line_no, f"expected {num_channels} channel(s) like the first series, "
                                                 f"found {len(channels)}")
        length = _series_length(channels, path, line_no)
        if header.get("equallength") is True and "serieslength" in header and length != header["serieslength"]:
            raise DataFormatError(path, line_no, f"series has {length} values but the header says @equalLength "
                                                 f"true, @seriesLength {header['serieslength']}")
        series.append(channels)
        lengths.append(length)
        if labelled:
            labels.append(label)
        label_lines.append(line_no)
    if not in_data:
        raise DataFormatError(path, None, "no @data header: not a .ts file")
    if not series:
        raise DataFormatError(path, None, "no series after @data")
    name = str(header.get("problemname") or path.stem.rsplit("_", 1)[0])
    return _RawSplit(path, series, lengths, labels if labelled else None, label_lines, declared_classes, name)


def _parse_tsv(path: Path) -> _RawSplit:
    series, lengths, labels, label_lines = [], [], [], []
    for line_no, raw in enumerate(_read_lines(path), start=1):
        if not raw.strip():
            continue
        line = raw.strip(" \r\n")  # not tabs: a leading tab means an empty label
        fields = line.split("\t")
        if len(fields) < 2:
            hint = " (this line uses commas: the .tsv format separates fields with tabs)" if "," in line else ""
            raise DataFormatError(path, line_no, f"expected a label then tab-separated values, found no tab{hint}")
        label = _normalise_label(fields[0])
        if not label or label in _MISSING_TOKENS:
            raise DataFormatError(path, line_no, f"missing class label in the first column ({fields[0]!r})")
        values = _parse_values(",".join(fields[1:]), path, line_no, "")
        lengths.append(_series_length([values], path, line_no))
        series.append([values])
        labels.append(label)
        label_lines.append(line_no)
    if not series:
        raise DataFormatError(path, None, "the file holds no series")
    return _RawSplit(path, series, lengths, labels, label_lines, None, path.stem.rsplit("_", 1)[0])


def _sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Numeric order when every label is a number ('2' before '10'), else string order."""
    unique = set(labels)
    try:
        return tuple(sorted(unique, key=float))
    except ValueError:
        return tuple(sorted(unique))


def _to_series_data(raw: _RawSplit, classes: tuple[str, ...]) -> SeriesData:
    index = {label: k for k, label in enumerate(classes)}
    for label, line_no in zip(raw.labels, raw.label_lines, strict=True):
        if label not in index:
            raise DataFormatError(raw.path, line_no, f"class label {label!r} is not among the dataset's classes "
                                                     f"{list(classes)}")
    x, lengths = _padded(raw)
    return SeriesData(
        x=x,
        y=torch.tensor([index[label] for label in raw.labels], dtype=torch.int64),
        lengths=lengths,
        classes=classes,
        name=raw.name,
    )


def _padded(raw: _RawSplit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (N, C, T) zero-padded past each series' end, and lengths (N,), None when every series spans T."""
    num_channels = len(raw.series[0])
    max_len = max(raw.lengths)
    x = np.zeros((len(raw.series), num_channels, max_len), dtype=STORAGE_DTYPE)
    for i, (channels, length) in enumerate(zip(raw.series, raw.lengths, strict=True)):
        for c, values in enumerate(channels):
            x[i, c, :length] = values[:length]
    lengths = torch.tensor(raw.lengths, dtype=torch.int64)
    return torch.from_numpy(x), None if bool((lengths == max_len).all()) else lengths


def _parse(path, require_labels: bool = True) -> _RawSplit:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix.lower() == ".ts":
        return _parse_ts(path, require_labels)
    if path.suffix.lower() == ".tsv":
        return _parse_tsv(path)
    raise ValueError(f"unknown data file type {path.name!r}: expected a .ts (UCR/UEA) or .tsv (UCR) file")


def _classes_for(raws: Sequence[_RawSplit]) -> tuple[str, ...]:
    """The @classLabel order of the first file that declares one, else all labels sorted."""
    for raw in raws:
        if raw.declared_classes is not None:
            return raw.declared_classes
    return _sort_labels(label for raw in raws for label in raw.labels)


def load_file(path, classes: Sequence[str] | None = None) -> SeriesData:
    """Load one ``.ts`` or ``.tsv`` file.

    ``classes`` fixes the label order (pass the training split's ``classes`` when loading its test split
    alone); by default it is the file's @classLabel order, else its labels sorted.
    """
    raw = _parse(path)
    return _to_series_data(raw, tuple(classes) if classes is not None else _classes_for([raw]))


def load_ts(path, classes: Sequence[str] | None = None) -> SeriesData:
    """Load a UCR/UEA ``.ts`` file (see :func:`load_file`)."""
    if Path(path).suffix.lower() != ".ts":
        raise ValueError(f"load_ts reads .ts files, got {path}")
    return load_file(path, classes)


def load_tsv(path, classes: Sequence[str] | None = None) -> SeriesData:
    """Load a UCR ``.tsv`` file: one series per line, the label first, then tab-separated values."""
    if Path(path).suffix.lower() != ".tsv":
        raise ValueError(f"load_tsv reads .tsv files, got {path}")
    return load_file(path, classes)


@dataclass(frozen=True)
class SeriesInputs:
    """Series to classify, as read by :func:`load_inputs`: ``x`` (N, C, T) float32 zero-padded past each series'
    end, ``lengths`` (N,) int64 or None when every series spans T, ``labels`` the N label strings as written in
    the file, or None for an unlabelled file."""

    x: torch.Tensor
    lengths: torch.Tensor | None
    labels: tuple[str, ...] | None
    name: str
    path: Path


def load_inputs(path) -> SeriesInputs:
    """Read one ``.ts`` or ``.tsv`` file for prediction: labels are optional (``@classLabel false`` in a ``.ts``
    file) and need not belong to any class list; everything else is checked as :func:`load_file` checks it."""
    raw = _parse(path, require_labels=False)
    x, lengths = _padded(raw)
    labels = None if raw.labels is None else tuple(raw.labels)
    return SeriesInputs(x, lengths, labels, raw.name, raw.path)
