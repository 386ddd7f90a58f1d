"""Tests for auxilia.data.files: format round trips and one-line DataErrors naming the file."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from auxilia.data.files import ArrayFile, load_array_file, save_array_file
from auxilia.errors import AuxiliaError, DataError

FORMATS = [".npz", ".csv", ".parquet", ".pq"]


def _error(path: Path, *fragments: str, **kwargs: Any) -> DataError:
    """Load ``path`` expecting a one-line DataError that names the file and every fragment."""
    with pytest.raises(DataError) as info:
        load_array_file(path, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, AuxiliaError)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def _write_table(path: Path, columns: dict[str, Any]) -> Path:
    frame = pd.DataFrame(columns)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


# --- round trips ---------------------------------------------------------------------------


def _expected_labels(y: npt.NDArray[Any]) -> npt.NDArray[Any]:
    integral = y.dtype.kind in "iu" or bool(np.all((y == np.trunc(y)) & (np.abs(y) < 2.0**63)))
    return y.astype(np.int64 if integral else np.float32)


@settings(max_examples=40, deadline=None)
@given(
    suffix=st.sampled_from(FORMATS),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    integer_labels=st.booleans(),
    data=st.data(),
)
def test_save_load_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    suffix: str,
    shape: tuple[int, ...],
    integer_labels: bool,
    data: st.DataObject,
) -> None:
    finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
    x = data.draw(hnp.arrays(np.float32, shape, elements=finite))
    y_dtype, y_elements = (
        (np.int64, st.integers(-1000, 1000)) if integer_labels else (np.float32, finite)
    )
    y = data.draw(hnp.arrays(y_dtype, shape[0], elements=y_elements))
    path = tmp_path_factory.mktemp("round") / f"data{suffix}"
    save_array_file(path, x, y)
    loaded = load_array_file(path)
    expected_x = x if suffix == ".npz" else x.reshape(shape[0], -1)
    assert loaded.x is not None
    assert loaded.y is not None
    assert loaded.x.dtype == np.float32
    assert loaded.x.shape == expected_x.shape
    np.testing.assert_array_equal(loaded.x, expected_x)
    expected_y = _expected_labels(y)
    assert loaded.y.dtype == expected_y.dtype
    np.testing.assert_array_equal(loaded.y, expected_y)
    assert loaded.num_samples == shape[0]
    assert loaded.path == path


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_x_only_and_y_only(tmp_path: Path, suffix: str) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_array_file(tmp_path / f"x{suffix}", x, None)
    only_x = load_array_file(tmp_path / f"x{suffix}", label_column=None)
    assert only_x.y is None
    assert only_x.x is not None
    np.testing.assert_array_equal(only_x.x, x)
    save_array_file(tmp_path / f"y{suffix}", None, [0, 1, 1])
    only_y = load_array_file(tmp_path / f"y{suffix}")
    assert only_y.x is None
    assert only_y.y is not None
    assert only_y.y.dtype == np.int64
    assert only_y.y.tolist() == [0, 1, 1]


def test_npz_keeps_shapes_and_multi_output_labels(tmp_path: Path) -> None:
    path = tmp_path / "img.npz"
    np.savez(path, x=np.zeros((3, 2, 4, 4), np.float64), y=np.ones((3, 2)), extra=np.arange(2))
    loaded = load_array_file(path)
    assert isinstance(loaded, ArrayFile)
    assert loaded.x is not None
    assert loaded.x.shape == (3, 2, 4, 4)
    assert loaded.x.dtype == np.float32
    assert loaded.y is not None
    assert loaded.y.shape == (3, 2)
    assert loaded.y.dtype == np.int64


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".npz"])
def test_integral_float_labels_become_int64(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    save_array_file(path, np.ones((3, 2)), np.array([0.0, 1.0, 2.0]))
    y = load_array_file(path).y
    assert y is not None
    assert y.dtype == np.int64
    assert y.tolist() == [0, 1, 2]
    save_array_file(path, np.ones((3, 2)), np.array([0.0, 1.5, 2.0]))
    y = load_array_file(path).y
    assert y is not None
    assert y.dtype == np.float32
    assert y.tolist() == [0.0, 1.5, 2.0]


def test_csv_integral_floats_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label\n0.5,0.0\n1.5,1.0\n")
    loaded = load_array_file(path, label_column="label")
    assert loaded.y is not None
    assert loaded.y.dtype == np.int64
    assert loaded.y.tolist() == [0, 1]
    assert loaded.x is not None
    assert loaded.x.tolist() == [[0.5], [1.5]]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_feature_columns_selects_in_given_order(tmp_path: Path, suffix: str) -> None:
    path = _write_table(
        tmp_path / f"d{suffix}",
        {"a": [1.0, 2.0], "b": [3, 4], "c": ["p", "q"], "target": [1, 0]},
    )
    loaded = load_array_file(path, label_column="target", feature_columns=["b", "a"])
    assert loaded.x is not None
    assert loaded.x.tolist() == [[3.0, 1.0], [4.0, 2.0]]
    assert loaded.y is not None
    assert loaded.y.tolist() == [1, 0]
    single = load_array_file(path, label_column="target", feature_columns="a")
    assert single.x is not None
    assert single.x.shape == (2, 1)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "d.npz"
    save_array_file(path, np.ones((2, 2)), [0, 1])
    save_array_file(path, np.zeros((3, 2)), [0, 1, 1])
    assert [p.name for p in path.parent.iterdir()] == ["d.npz"]
    assert load_array_file(path).num_samples == 3


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", FORMATS)
def test_missing_file(tmp_path: Path, suffix: str) -> None:
    _error(tmp_path / f"nope{suffix}", "does not exist")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "d.csv").mkdir()
    _error(tmp_path / "d.csv", "is not a file")


def test_unsupported_suffix_lists_supported(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("a,y\n1,0\n")
    _error(path, "unsupported file type '.txt'", ".npz", ".csv", ".parquet", ".pq")
    with pytest.raises(DataError, match="unsupported"):
        save_array_file(tmp_path / "d.json", np.ones((1, 1)), [0])


@pytest.mark.parametrize("suffix", FORMATS)
def test_random_bytes_and_empty_files_cannot_be_parsed(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(256))
    _error(path, "cannot be parsed")
    path.write_bytes(b"")
    _error(path, "cannot be parsed")


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_truncated_binary_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    save_array_file(path, np.ones((50, 4)), np.arange(50))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _error(path, "cannot be parsed")


def test_malformed_csv(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,y\n1,0\n2,1,7,8\n")
    _error(path, "cannot be parsed as .csv", "Expected 2 fields")


def test_corrupt_npz_member(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    save_array_file(path, np.arange(400, dtype=np.float64).reshape(100, 4), None)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x93NUMPY") + 200  # inside the array data of x.npy
    raw[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    assert zipfile.is_zipfile(path)
    _error(path, "cannot be parsed as .npz")


def test_npz_refuses_pickled_arrays(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    _error(path, "cannot be parsed as .npz", "allow_pickle")


def test_npy_named_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    with path.open("wb") as handle:
        np.save(handle, np.ones(3))
    _error(path, "not a zip archive")


def test_npz_without_x_or_y_lists_arrays(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, features=np.ones((2, 2)), labels=np.zeros(2))
    _error(path, "neither 'x' nor 'y'", "features, labels")


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_length_mismatch_gives_both_lengths(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(path, x=np.ones((5, 2)), y=np.zeros(3))
        _error(path, "x has 5 rows but y has 3")
    with pytest.raises(DataError, match="x has 5 rows but y has 3"):
        save_array_file(path, np.ones((5, 2)), np.zeros(3))


@pytest.mark.parametrize("suffix", FORMATS)
def test_zero_rows(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    save_array_file(path, np.ones((0, 3)), np.zeros(0, dtype=np.int64))
    _error(path, "has no samples")


def test_header_only_csv_has_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n")
    _error(path, "has no samples")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_columns_list_available(tmp_path: Path, suffix: str) -> None:
    path = _write_table(tmp_path / f"d{suffix}", {"a": [1.0], "b": [2.0], "y": [0]})
    _error(
        path, "label column 'target' not found", "available columns: a, b, y", label_column="target"
    )
    _error(path, "feature column 'c' not found", "a, b, y", feature_columns=["a", "c"])
    _error(path, "both the label and a feature", feature_columns=["a", "y"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_first_non_numeric_column_is_named(tmp_path: Path, suffix: str) -> None:
    path = _write_table(
        tmp_path / f"d{suffix}", {"a": [1.0], "name": ["x"], "tag": ["t"], "y": [0]}
    )
    _error(path, "feature column 'name' is not numeric")
    path = _write_table(tmp_path / f"e{suffix}", {"a": [1.0], "y": ["cat"]})
    _error(path, "label column 'y' is not numeric")


def test_non_numeric_npz_array(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array(["a", "b"]), y=np.zeros(2))
    _error(path, "x has non-numeric dtype")


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_nan_and_inf_are_counted(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    x = np.ones((4, 2))
    x[1, 0], x[2, 1], x[3, 0] = np.nan, np.inf, -np.inf
    save_array_file(path, x, [0, 1, 0, 1])
    _error(path, "x contains 1 NaN and 2 infinite values", "first at sample 1")
    save_array_file(path, np.ones((3, 2)), [0.5, np.nan, 1.0])
    _error(path, "y contains 1 NaN value (first at sample 1)")


def test_float32_overflow_is_reported_as_infinite(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([[1e300], [1.0]]), y=np.array([0, 1]))
    _error(path, "x contains 1 infinite value")


def test_zero_dim_x(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.float64(3.0))
    _error(path, "x is a 0-d scalar")
    with pytest.raises(DataError, match="cannot save x"):
        save_array_file(path, np.float64(3.0), None)


def test_bad_label_shapes(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((2, 2)), y=np.ones((2, 2, 2)))
    _error(path, "y has shape (2, 2, 2)")
    with pytest.raises(DataError, match="one label column"):
        save_array_file(tmp_path / "d.csv", np.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(DataError, match="nothing to save"):
        save_array_file(path, None, None)
