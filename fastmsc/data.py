"""Time-series classification data: UCR/UEA ``.ts`` and UCR ``.tsv`` loaders, dataset lookup, a synthetic set.

Every loader returns a :class:`SeriesData`: ``x`` (N, C, T) float32, zero-padded past each series' end;
``y`` (N,) int64 class indices in 0..K-1; ``lengths`` (N,) int64 valid steps per series, or None when all
series span the full T; ``classes`` the K label strings, ``classes[y[i]]`` being series i's label.

Missing values (``?``, ``NaN``) are handled one way in both formats: missing values at the *end* of a
series are padding (the UCR archive pads unequal-length series that way), so they shorten that series'
length; a missing value before the last present one is an error naming the file, line and position,
since no single imputation suits every dataset.

Malformed files raise :class:`DataFormatError` (a ValueError) whose message names the file, the line
number and what was wrong. Values are read as float64 and stored as float32, the dtype training uses (a
float64 model gets them upcast exactly); an infinite value, or a finite one beyond float32's range
(|x| > 3.4e38, which would become infinite), is such an error too, naming the channel and value position.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".ts", ".tsv")
STORAGE_DTYPE = np.float32  # SeriesData.x of every loader
_MISSING_TOKENS = {"?", "nan", "NaN", "NAN", ""}


class DataFormatError(ValueError):
    """A malformed data file; ``path`` and ``line`` (1-based, None for whole-file problems) say where."""

    def __init__(self, path, line: int | None, message: str):
        self.path, self.line, self.reason = Path(path), line, message
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class SeriesData:
    """A labelled set of series; see the module docstring for the tensor shapes."""

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None
    classes: tuple[str, ...]
    name: str = ""

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or self.x.dim() != 3:
            got = tuple(self.x.shape) if isinstance(self.x, torch.Tensor) else type(self.x).__name__
            raise ValueError(f"x must be a (N, C, T) tensor, got {got}")
        n = self.x.shape[0]
        if not isinstance(self.y, torch.Tensor) or self.y.shape != (n,) or self.y.dtype != torch.int64:
            got = (tuple(self.y.shape), self.y.dtype) if isinstance(self.y, torch.Tensor) else type(self.y).__name__
            raise ValueError(f"y must be an int64 tensor of shape ({n},) (one label per series), got {got}")
        if self.lengths is not None and (self.lengths.shape != (n,) or self.lengths.dtype != torch.int64):
            raise ValueError(f"lengths must be None or an int64 tensor of shape ({n},), "
                             f"got {tuple(self.lengths.shape)} {self.lengths.dtype}")
        if n and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise ValueError(f"y must hold class indices in [0, {len(self.classes) - 1}] "
                             f"({len(self.classes)} classes), got values in [{int(self.y.min())}, {int(self.y.max())}]")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_channels(self) -> int:
        return self.x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> torch.Tensor:
        """(K,) int64: how many series carry each class."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def series_lengths(self) -> torch.Tensor:
        """(N,) int64 valid steps per series (T for all when ``lengths`` is None)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((len(self),), self.x.shape[2], dtype=torch.int64)


def from_tensors(x, y, lengths=None, classes: Sequence[str] | None = None, name: str = "") -> SeriesData:
    """Wrap tensors x (N, C, T), y (N,) labels 0..K-1 and optional lengths (N,) as a :class:`SeriesData`.

    ``classes`` defaults to the label numbers as strings, K = max(y) + 1.
    """
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
    y = y.to(torch.int64)
    if lengths is not None:
        lengths = torch.as_tensor(lengths).to(torch.int64)
    if classes is None:
        classes = tuple(str(k) for k in range(int(y.max()) + 1 if y.numel() else 0))
    return SeriesData(x, y, lengths, tuple(classes), name)


# --------------------------------------------------------------------------------------------- parsing


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
    labels: list[str]
    label_lines: list[int]
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


def _parse_ts(path: Path) -> _RawSplit:
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
                if header.get("classlabel") is not True:
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
        if len(fields) < 2:
            raise DataFormatError(path, line_no, "expected values then ':' then the class label, found no ':'")
        label = fields[-1].strip()
        if not label:
            raise DataFormatError(path, line_no, "the class label (after the last ':') is empty")
        if declared_classes is not None and label not in declared_classes:
            raise DataFormatError(path, line_no, f"class label {label!r} is not among the @classLabel labels "
                                                 f"{list(declared_classes)}")
        channels = [_parse_values(text, path, line_no, f"channel {c + 1}, ") for c, text in enumerate(fields[:-1])]
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
        labels.append(label)
        label_lines.append(line_no)
    if not in_data:
        raise DataFormatError(path, None, "no @data header: not a .ts file")
    if not series:
        raise DataFormatError(path, None, "no series after @data")
    name = str(header.get("problemname") or path.stem.rsplit("_", 1)[0])
    return _RawSplit(path, series, lengths, labels, label_lines, declared_classes, name)


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
    num_channels = len(raw.series[0])
    max_len = max(raw.lengths)
    x = np.zeros((len(raw.series), num_channels, max_len), dtype=STORAGE_DTYPE)
    for i, (channels, length) in enumerate(zip(raw.series, raw.lengths, strict=True)):
        for c, values in enumerate(channels):
            x[i, c, :length] = values[:length]
    lengths = torch.tensor(raw.lengths, dtype=torch.int64)
    return SeriesData(
        x=torch.from_numpy(x),
        y=torch.tensor([index[label] for label in raw.labels], dtype=torch.int64),
        lengths=None if bool((lengths == max_len).all()) else lengths,
        classes=classes,
        name=raw.name,
    )


def _parse(path) -> _RawSplit:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix.lower() == ".ts":
        return _parse_ts(path)
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


def znormalise_series(data: SeriesData, eps: float = 1e-8) -> SeriesData:
    """Per series and channel: subtract the mean and divide by the standard deviation over the valid steps.

    A constant channel (std < eps) becomes zeros. Padding stays zero.
    """
    lengths = data.series_lengths()
    valid = (torch.arange(data.x.shape[2])[None, :] < lengths[:, None])[:, None, :]  # (N, 1, T)
    x = data.x.double()
    count = lengths.double()[:, None, None]
    mean = (x * valid).sum(-1, keepdim=True) / count
    var = (((x - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    std = var.sqrt()
    normalised = torch.where(std < eps, torch.zeros_like(x), (x - mean) / std.clamp_min(eps)) * valid
    return replace(data, x=normalised.float())


# ----------------------------------------------------------------------------------------------- synthetic


def synthetic(num_train: int = 240, num_test: int = 240, length: int = 96, num_classes: int = 4, channels: int = 1,
              variable_length: bool = False, seed: int = 0) -> tuple[SeriesData, SeriesData]:
    """A built-in dataset whose classes differ in patterns at different time scales.

    Every series is noise plus a slow random-phase wave shared by all classes (a distractor), plus one
    class-specific burst: a windowed oscillation at a random position whose period grows with the class
    (3, 6, 12, ... steps), so telling classes apart needs the short and the long conv kernels and the
    sequence model. Deterministic in ``seed``; train and test come from different draws of one generator.
    With ``variable_length``, lengths are drawn in [length // 2, length] and the rest is zero padding.
    """
    for arg, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1), ("length", length, 16),
                            ("num_classes", num_classes, 2), ("channels", channels, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    generator = torch.Generator().manual_seed(int(seed))

    def draw(count):
        y = torch.arange(count) % num_classes
        y = y[torch.randperm(count, generator=generator)]
        if variable_length:
            lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
        else:
            lengths = torch.full((count,), length)
        t = torch.arange(length, dtype=torch.float64)[None, None, :]
        uniform = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
        x = 0.3 * torch.randn(count, channels, length, generator=generator, dtype=torch.float64)
        x += 0.5 * torch.sin(2 * math.pi * t / length + 2 * math.pi * uniform(count, channels, 1))
        period = (3.0 * 2.0 ** y.double())[:, None, None]
        width = 1.5 * period.clamp_min(4.0)  # a few cycles of the oscillation
        span = lengths.double()[:, None, None]
        centre = width + (span - 2 * width).clamp_min(0) * uniform(count, 1, 1)
        amplitude = 1.0 + 0.5 * uniform(count, channels, 1)
        phase = 2 * math.pi * uniform(count, channels, 1)
        window = torch.exp(-0.5 * ((t - centre) / width) ** 2)
        x += amplitude * window * torch.sin(2 * math.pi * (t - centre) / period + phase)
        x *= (t < span).double()
        return SeriesData(x.float(), y.to(torch.int64), None if not variable_length else lengths.to(torch.int64),
                          tuple(f"scale{k}" for k in range(num_classes)), "synthetic")

    return draw(num_train), draw(num_test)
