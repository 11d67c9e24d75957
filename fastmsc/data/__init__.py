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

Modules: ``_series`` (SeriesData, from_tensors, znormalise_series), ``_formats`` (the .ts/.tsv parsers),
``_folders`` (dataset folders and lookup by name), ``_synthetic``; import their names from here.
"""

from ._folders import find_dataset, load_dataset, load_split, split_files
from ._formats import SUFFIXES, SeriesInputs, load_file, load_inputs, load_ts, load_tsv
from ._series import STORAGE_DTYPE, DataFormatError, SeriesData, from_tensors, znormalise, znormalise_series
from ._synthetic import synthetic

__all__ = [
    "STORAGE_DTYPE", "SUFFIXES", "DataFormatError", "SeriesData", "SeriesInputs", "find_dataset", "from_tensors",
    "load_dataset", "load_file", "load_inputs", "load_split", "load_ts", "load_tsv", "split_files", "synthetic",
    "znormalise", "znormalise_series",
]
