"""fastmsc.data: .ts/.tsv loaders, label mapping, missing values, malformed files, lookup, synthetic data."""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

from fastmsc import data

# name: (train size, test size, channels, classes); from the archive's description (../shared/data/README.md)
SHARED = {
    "GunPoint": (50, 150, 1, 2),
    "ItalyPowerDemand": (67, 1029, 1, 2),
    "JapaneseVowels": (270, 370, 12, 9),
}


def _raw_series(path, line_index):
    """The values of the line_index-th data line of a .ts file, parsed independently of fastmsc."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
    data_lines = [line for line in lines[start:] if line.strip()]
    *channels, label = data_lines[line_index].split(":")
    return [[float(v) for v in channel.split(",")] for channel in channels], label.strip()


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_datasets_load(shared_data, name):
    train, test = data.load_split(shared_data / name)
    n_train, n_test, channels, classes = SHARED[name]
    assert (len(train), len(test)) == (n_train, n_test)
    assert train.num_channels == test.num_channels == channels
    assert train.classes == test.classes and train.num_classes == classes
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert int(train.class_counts().sum()) == n_train and int(test.class_counts().sum()) == n_test
    assert bool((train.class_counts() > 0).all()) and bool((test.class_counts() > 0).all())
    # Spot-check random series against the file, parsed here without fastmsc (reported seed on failure).
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    folder = shared_data / name
    for split, path in ((train, folder / f"{name}_TRAIN.ts"), (test, folder / f"{name}_TEST.ts")):
        lengths = split.series_lengths()
        for i in rng.sample(range(len(split)), 5):
            values, label = _raw_series(path, i)
            length = len(values[0])
            assert int(lengths[i]) == length, f"seed {seed}, series {i}"
            expected = torch.tensor(values, dtype=torch.float32)
            assert torch.equal(split.x[i, :, :length], expected), f"seed {seed}, series {i}"
            assert bool((split.x[i, :, length:] == 0).all()), f"seed {seed}, series {i}: padding must be zero"
            assert split.classes[int(split.y[i])] == label, f"seed {seed}, series {i}"


def test_equal_length_datasets_have_no_lengths(shared_data):
    train, test = data.load_split(shared_data / "GunPoint")
    assert train.lengths is None and test.lengths is None
    assert train.x.shape[2] == test.x.shape[2] == 150


def test_japanese_vowels_lengths(shared_data):
    train, test = data.load_split(shared_data / "JapaneseVowels")
    lengths = torch.cat([train.lengths, test.lengths])
    assert int(lengths.min()) >= 7 and int(lengths.max()) <= 29
    assert len(set(lengths.tolist())) > 5, "JapaneseVowels must load with many different lengths"
    assert train.x.shape[2] == int(train.lengths.max()) and test.x.shape[2] == int(test.lengths.max())
    # Every series is zero past its length, and its last valid step holds at least one non-zero value.
    for split in (train, test):
        steps = torch.arange(split.x.shape[2])
        past_end = steps[None, None, :] >= split.lengths[:, None, None]
        assert bool((split.x.masked_select(past_end) == 0).all())
        last = split.x[torch.arange(len(split)), :, split.lengths - 1]
        assert bool((last != 0).any(dim=1).all())


def test_label_order_follows_the_class_label_header(tmp_path):
    header = "@problemName Toy\n@univariate false\n@dimensions 2\n@equalLength false\n@classLabel true zebra apple\n"
    (tmp_path / "Toy_TRAIN.ts").write_text(
        header + "@data\n1,2,3:4,5,6:apple\n7,8:9,10:zebra\n1,?,?:2,?,?:apple\n")
    (tmp_path / "Toy_TEST.ts").write_text(header + "@data\n0.5,1.5:2.5,3.5:zebra\n")
    train, test = data.load_split(tmp_path)
    assert train.classes == test.classes == ("zebra", "apple")
    assert train.y.tolist() == [1, 0, 1] and test.y.tolist() == [0]
    assert train.lengths.tolist() == [3, 2, 1]  # trailing '?' are padding of a shorter series
    assert test.lengths is None and test.x.shape == (1, 2, 2)
    expected = torch.tensor([[[1, 2, 3], [4, 5, 6]], [[7, 8, 0], [9, 10, 0]], [[1, 0, 0], [2, 0, 0]]],
                            dtype=torch.float32)
    assert torch.equal(train.x, expected)
    assert train.name == "Toy"


def test_tsv_loader(tmp_path):
    rows_train = ["10\t1.0\t2.0\t3.0\t4.0", "2\t0.5\t0.25\tNaN\tNaN", "1.0000000e+00\t-1\t-2\t-3\t-4", "2\t5\t6\t7\t8"]
    rows_test = ["1\t9\t9\t9\t9", "10\t1\t2\t3\tnan"]
    (tmp_path / "Small_TRAIN.tsv").write_text("\n".join(rows_train) + "\n")
    (tmp_path / "Small_TEST.tsv").write_text("\n".join(rows_test) + "\n\n")
    train, test = data.load_split(tmp_path, "Small")
    assert train.classes == test.classes == ("1", "2", "10")  # numeric order; '1.0000000e+00' is label 1
    assert train.y.tolist() == [2, 1, 0, 1] and test.y.tolist() == [0, 2]
    assert train.x.shape == (4, 1, 4) and train.lengths.tolist() == [4, 2, 4, 4]
    assert torch.equal(train.x[1, 0], torch.tensor([0.5, 0.25, 0.0, 0.0]))
    assert test.lengths.tolist() == [4, 3]
    single = data.load_tsv(tmp_path / "Small_TEST.tsv", classes=train.classes)
    assert torch.equal(single.y, test.y)


def test_values_near_the_float32_limit_load(tmp_path):
    path = tmp_path / "Big_TRAIN.ts"
    path.write_text(TS_HEADER + "@data\n3.4e38,-3.4e38,1e-50:a\n")
    x = data.load_ts(path).x
    assert x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    assert x[0, 0].tolist() == [np.float32(3.4e38), np.float32(-3.4e38), 0.0]


def test_load_file_with_explicit_classes_rejects_unknown_label(tmp_path):
    path = tmp_path / "A_TEST.tsv"
    path.write_text("1\t1\t2\n3\t1\t2\n")
    with pytest.raises(data.DataFormatError, match=r"A_TEST\.tsv, line 2: class label '3'"):
        data.load_file(path, classes=("1", "2"))


TS_HEADER = "@problemName Bad\n@univariate true\n@equalLength true\n@seriesLength 3\n@classLabel true a b\n"

MALFORMED_TS = [
    # (file body, line number named in the error, words the error must contain)
    (TS_HEADER + "@data\n1,2,3:a\n1,x,3:b\n", 8, "value 2: cannot read 'x'"),
    (TS_HEADER + "@data\n1,2,3:a\n1,2,3:c\n", 8, "class label 'c' is not among"),
    (TS_HEADER + "@data\n1,2,3:a\n1,2:b\n", 8, "@seriesLength 3"),
    (TS_HEADER + "@data\n1,2,3:a\n1,2,3:4,5,6:b\n", 8, "expected 1 channel(s)"),
    (TS_HEADER + "@data\n1,?,3:a\n", 7, "missing value inside the series"),
    (TS_HEADER + "@data\n1,2,3\n", 7, "found no ':'"),
    (TS_HEADER + "@data\n1,2,3:\n", 7, "class label (after the last ':') is empty"),
    (TS_HEADER + "@data\n?,?,?:a\n", 7, "no values"),
    (TS_HEADER + "@data\n1,2,inf:a\n", 7, "infinite value"),
    # finite in float64 (what the text is read as) but infinite in float32 (what training gets)
    (TS_HEADER + "@data\n1,2,3:a\n1,1e39,3:b\n", 8, "value 2: '1e39' is beyond the range of float32"),
    ("@problemName Bad\n@univariate false\n@classLabel true a\n@data\n1,2:3,-4e38:a\n", 5,
     "channel 2, value 2: '-4e38' is beyond the range of float32"),
    (TS_HEADER + "1,2,3:a\n@data\n", 6, "data line before the @data header"),
    (TS_HEADER + "@data\n1,2,3:a\n@seriesLength 4\n", 8, "after @data"),
    ("@problemName Bad\n@univariate maybe\n", 2, "'true' or 'false'"),
    ("@problemName Bad\n@timeStamps true\n", 2, "not supported"),
    ("@problemName Bad\n@classLabel false\n@data\n", 3, "unlabelled"),
    ("@problemName Bad\n@targetLabel true\n@data\n", 3, "regression"),
    ("@problemName Bad\n@classLabel true a a\n", 2, "lists a label twice"),
    ("@problemName Bad\n@dimensions 0\n", 2, "positive integer"),
    ("@problemName Bad\n@univariate false\n@classLabel true a\n@data\n1,2:3,4,5:a\n", 5, "channels of a series"),
    ("@problemName Bad\n@univariate false\n@classLabel true a\n@data\n1,2:3,4:a\n1,2:a\n", 6, "like the first series"),
]


@pytest.mark.parametrize("body,line,words", MALFORMED_TS, ids=[w for _, _, w in MALFORMED_TS])
def test_malformed_ts_names_file_line_and_problem(tmp_path, body, line, words):
    path = tmp_path / "Bad_TRAIN.ts"
    path.write_text(body)
    with pytest.raises(data.DataFormatError) as info:
        data.load_ts(path)
    message = str(info.value)
    assert f"Bad_TRAIN.ts, line {line}: " in message and words in message, message
    assert info.value.line == line and info.value.path == path


@pytest.mark.parametrize("body,words", [
    (TS_HEADER, "no @data header"),
    (TS_HEADER + "@data\n\n", "no series after @data"),
])
def test_malformed_ts_whole_file_problems(tmp_path, body, words):
    path = tmp_path / "Bad_TRAIN.ts"
    path.write_text(body)
    with pytest.raises(data.DataFormatError, match=words) as info:
        data.load_ts(path)
    assert str(path) in str(info.value) and info.value.line is None


MALFORMED_TSV = [
    ("1\t1\t2\n2,3,4,5\n", 2, "found no tab (this line uses commas"),
    ("1\t1\t2\n\t3\t4\n", 2, "missing class label"),
    ("1\t1\t2\n2\t3\tfoo\n", 2, "value 2: cannot read 'foo'"),
    ("1\t1\tNaN\t3\n", 1, "missing value inside the series"),
    ("1\t1\t2\n2\t3\t1e39\n", 2, "value 2: '1e39' is beyond the range of float32"),
]


@pytest.mark.parametrize("body,line,words", MALFORMED_TSV, ids=[w for _, _, w in MALFORMED_TSV])
def test_malformed_tsv_names_file_line_and_problem(tmp_path, body, line, words):
    path = tmp_path / "Bad_TRAIN.tsv"
    path.write_text(body)
    with pytest.raises(data.DataFormatError) as info:
        data.load_tsv(path)
    message = str(info.value)
    assert f"Bad_TRAIN.tsv, line {line}: " in message and words in message, message


def test_test_split_with_other_channel_count_is_rejected(tmp_path):
    (tmp_path / "M_TRAIN.tsv").write_text("1\t1\t2\n")
    (tmp_path / "M_TEST.ts").write_text("@univariate false\n@classLabel true 1\n@data\n1,2:3,4:1\n")
    (tmp_path / "M_TEST.tsv").write_text("1\t1\t2\t3\n")
    train, test = data.load_split(tmp_path, "M")  # .tsv pair is complete; the lone .ts is ignored
    assert train.x.shape == (1, 1, 2) and test.x.shape == (1, 1, 3)
    (tmp_path / "N_TRAIN.ts").write_text("@univariate true\n@classLabel true 1\n@data\n1,2:1\n")
    (tmp_path / "N_TEST.ts").write_text("@univariate false\n@classLabel true 1\n@data\n1,2:3,4:1\n")
    with pytest.raises(data.DataFormatError, match=r"N_TEST\.ts, line 4: test series have 2 channel"):
        data.load_split(tmp_path, "N")


def test_split_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.split_files(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no NAME_TRAIN/NAME_TEST pair"):
        data.split_files(tmp_path)
    (tmp_path / "A_TRAIN.tsv").write_text("1\t1\n")
    (tmp_path / "A_TEST.tsv").write_text("1\t1\n")
    assert data.split_files(tmp_path) == (tmp_path / "A_TRAIN.tsv", tmp_path / "A_TEST.tsv")
    (tmp_path / "B_TRAIN.tsv").write_text("1\t1\n")
    (tmp_path / "B_TEST.tsv").write_text("1\t1\n")
    with pytest.raises(ValueError, match="several datasets"):
        data.split_files(tmp_path)
    assert data.split_files(tmp_path, "B")[0].name == "B_TRAIN.tsv"
    with pytest.raises(FileNotFoundError, match="C_TRAIN/C_TEST"):
        data.split_files(tmp_path, "C")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="expected a .ts"):
        data.load_file(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_file(tmp_path / "absent.ts")


def _write_toy(folder, name="Toy"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_TRAIN.tsv").write_text("1\t1\t2\n2\t3\t4\n")
    (folder / f"{name}_TEST.tsv").write_text("2\t5\t6\n")


def test_find_dataset_in_fastmsc_data(tmp_path, monkeypatch):
    _write_toy(tmp_path / "root1" / "Toy")
    _write_toy(tmp_path / "root2", "Flat")
    roots = [tmp_path / "missing", tmp_path / "root1", tmp_path / "root2"]
    monkeypatch.setenv("FASTMSC_DATA", os.pathsep.join(str(root) for root in roots))
    assert data.find_dataset("Toy") == tmp_path / "root1" / "Toy"
    assert data.find_dataset("Flat") == tmp_path / "root2"
    train, test = data.load_dataset("Toy")
    assert len(train) == 2 and len(test) == 1 and test.y.tolist() == [1]
    with pytest.raises(FileNotFoundError, match="dataset 'Nope' not found. Searched: .*root1"):
        data.find_dataset("Nope")
    with pytest.raises(ValueError, match="bare name"):
        data.find_dataset("a/b")


def test_find_dataset_in_bundled_package_data_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "aeon"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('aeon must not be imported to find its data')\n")
    _write_toy(package / "datasets" / "data" / "Bundled", "Bundled")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("FASTMSC_DATA", raising=False)
    monkeypatch.delitem(sys.modules, "aeon", raising=False)
    assert data.find_dataset("Bundled") == package / "datasets" / "data" / "Bundled"
    assert "aeon" not in sys.modules


def test_find_dataset_shared(shared_data, monkeypatch):
    monkeypatch.setenv("FASTMSC_DATA", str(shared_data))
    assert data.find_dataset("ItalyPowerDemand") == shared_data / "ItalyPowerDemand"


def test_synthetic_is_deterministic_by_seed():
    seed = random.randrange(2**31)
    a_train, a_test = data.synthetic(num_train=40, num_test=20, length=48, num_classes=3, channels=2, seed=seed)
    b_train, b_test = data.synthetic(num_train=40, num_test=20, length=48, num_classes=3, channels=2, seed=seed)
    c_train, _ = data.synthetic(num_train=40, num_test=20, length=48, num_classes=3, channels=2, seed=seed + 1)
    for a, b in ((a_train, b_train), (a_test, b_test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y), f"seed {seed}"
    assert not torch.equal(a_train.x, c_train.x), f"seed {seed}"
    assert not torch.equal(a_train.x[: len(a_test)], a_test.x), f"seed {seed}: train and test must be other draws"
    assert a_train.x.shape == (40, 2, 48) and a_train.lengths is None and a_train.num_classes == 3
    assert a_train.class_counts().tolist() == [14, 13, 13]
    assert bool(torch.isfinite(a_train.x).all())


def test_synthetic_variable_length():
    seed = random.randrange(2**31)
    train, _ = data.synthetic(num_train=64, num_test=8, length=40, variable_length=True, seed=seed)
    assert int(train.lengths.min()) >= 20 and int(train.lengths.max()) <= 40, f"seed {seed}"
    past_end = torch.arange(40)[None, None, :] >= train.lengths[:, None, None]
    assert bool((train.x.masked_select(past_end) == 0).all()), f"seed {seed}"


def test_synthetic_classes_differ_in_time_scale():
    """The class burst's dominant period grows with the class: check the mean spectrum peaks in order."""
    train, _ = data.synthetic(num_train=400, num_test=4, length=128, num_classes=3, seed=random.randrange(2**31))
    spectrum = torch.fft.rfft(train.x[:, 0].double(), dim=-1).abs() ** 2
    peaks = []
    for k in range(3):
        mean = spectrum[train.y == k].mean(0)
        mean[:3] = 0  # the slow shared wave sits in the lowest bins
        peaks.append(int(mean.argmax()))
    assert peaks[0] > peaks[1] > peaks[2], peaks


def test_znormalise():
    seed = random.randrange(2**31)
    generator = torch.Generator().manual_seed(seed)
    x = 3 + 2 * torch.randn(5, 2, 9, generator=generator)
    lengths = torch.tensor([9, 4, 7, 2, 9])
    x *= (torch.arange(9)[None, :] < lengths[:, None])[:, None, :]
    x[4, 1, :] = 5.0  # a constant channel
    normalised = data.znormalise_series(data.from_tensors(x, torch.tensor([0, 1, 0, 1, 0]), lengths))
    for i, length in enumerate(lengths.tolist()):
        for c in range(2):
            valid = normalised.x[i, c, :length].double()
            if (i, c) == (4, 1):
                assert bool((valid == 0).all())
                continue
            assert abs(float(valid.mean())) < 1e-6, f"seed {seed}"
            assert abs(float(valid.std(unbiased=False)) - 1) < 1e-5, f"seed {seed}"
            assert bool((normalised.x[i, c, length:] == 0).all())


def test_from_tensors_validates():
    x = torch.zeros(3, 1, 5)
    with pytest.raises(TypeError, match="integer class indices"):
        data.from_tensors(x, torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        data.from_tensors(x, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\]"):
        data.from_tensors(x, torch.tensor([0, 1, 2]), classes=("a", "b"))
    with pytest.raises(ValueError, match=r"\(N, C, T\)"):
        data.from_tensors(torch.zeros(3, 5), torch.tensor([0, 1, 1]))
    made = data.from_tensors(np.zeros((3, 1, 5)), [0, 2, 1], lengths=[5, 1, 3])
    assert made.classes == ("0", "1", "2") and made.lengths.dtype == torch.int64
