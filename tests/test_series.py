import numpy as np
import pandas as pd
import pytest

from models import ModelSpec
from tasks.series import (
    DataError,
    InvalidSeries,
    SeriesData,
    load_table,
    make_windows,
    sliding_windows,
    validate_series,
    validate_table,
    window_values,
)
from tests.conftest import series_frame

SPEC = ModelSpec(window=8, horizon=2)


def test_sliding_windows_pair_inputs_with_the_values_that_follow():
    x, y = sliding_windows(np.arange(12, dtype=np.float32), window=4, horizon=2)
    assert x.shape == (7, 4) and y.shape == (7, 2)
    np.testing.assert_array_equal(x[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(y[0], [4, 5])
    np.testing.assert_array_equal(y[-1], [10, 11])


def test_windows_hold_out_the_tail_and_normalise_with_training_stats_only():
    values = np.concatenate([np.zeros(90) + np.arange(90) % 3, np.full(10, 1000.0)]).astype(np.float32)
    spec = ModelSpec(window=8, horizon=2, holdout_fraction=0.1)
    windows = make_windows(values, spec)
    train_part = values[:90]
    assert windows.mean == pytest.approx(train_part.mean())
    assert windows.std == pytest.approx(train_part.std())
    # No training target reaches into the held-out tail (the 1000s).
    assert windows.y_train.max() < 10
    # Every validation target lies in the tail, and the tail is covered.
    scaled_tail = (1000.0 - windows.mean) / windows.std
    np.testing.assert_allclose(windows.y_val, scaled_tail, rtol=1e-5)
    assert len(windows.y_val) == 10 - 2 + 1


def test_shortest_valid_series_gives_one_training_and_one_validation_window():
    spec = ModelSpec(window=8, horizon=2)
    values = np.random.default_rng(0).normal(size=spec.min_length()).astype(np.float32)
    windows = make_windows(values, spec)
    assert len(windows.x_train) >= 1 and len(windows.x_val) >= 1
    assert validate_series("s", series_frame("s", values), spec).__class__ is SeriesData
    too_short = validate_series("s", series_frame("s", values[:-1]), spec)
    assert isinstance(too_short, InvalidSeries) and "too short" in too_short.reason


@pytest.mark.parametrize(
    "values, reason",
    [
        ([1.0, np.nan] + [float(i) for i in range(40)], "NaN"),
        ([1.0, np.inf] + [float(i) for i in range(40)], "infinite"),
        ([5.0] * 40, "constant"),
        (["x", "1"] + [str(i) for i in range(40)], "non-numeric"),
        ([1.0, 2.0], "too short"),
    ],
)
def test_bad_series_are_invalid_with_a_reason(values, reason):
    result = validate_series("bad", series_frame("bad", values), SPEC)
    assert isinstance(result, InvalidSeries)
    assert reason in result.reason


def test_duplicated_timestamps_are_invalid_and_unsorted_ones_are_sorted():
    frame = series_frame("s", range(40))
    duplicated = pd.concat([frame, frame.iloc[[3]]])
    assert "duplicated" in validate_series("s", duplicated, SPEC).reason
    shuffled = frame.sample(frac=1, random_state=0)
    result = validate_series("s", shuffled, SPEC)
    np.testing.assert_array_equal(result.values, np.arange(40, dtype=np.float32))


def test_validate_table_keeps_input_order_and_separates_bad_series():
    table = pd.concat(
        [series_frame("z", range(50)), series_frame("bad", [1.0] * 50), series_frame("a", np.arange(50) ** 0.5)]
    )
    valid, invalid = validate_table(table, SPEC)
    assert [s.series_id for s in valid] == ["z", "a"]
    assert [s.series_id for s in invalid] == ["bad"]


def test_load_table_names_the_missing_columns(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame({"series_id": ["a"], "value": [1.0]}).to_parquet(path)
    with pytest.raises(DataError, match=r"lacks column\(s\) timestamp.*needs columns series_id, timestamp, value"):
        load_table(path)


def test_load_table_rejects_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("this is not parquet")
    with pytest.raises(DataError, match="cannot read .*junk.parquet as parquet"):
        load_table(junk)
    with pytest.raises(DataError, match="no rows"):
        load_table(pd.DataFrame({"series_id": [], "timestamp": [], "value": []}))


def test_load_table_reads_csv(tmp_path):
    path = tmp_path / "t.csv"
    series_frame("a", range(5)).to_csv(path, index=False)
    assert list(load_table(path).columns) == ["series_id", "timestamp", "value"]


def test_window_values_gives_back_the_values_behind_sliding_windows_and_any_prefix_of_them():
    values = np.arange(20, dtype=np.float32) ** 1.5
    x, y = sliding_windows(values, 5, 3)
    assert np.array_equal(window_values(x, y), values)
    assert np.array_equal(window_values(x[:4], y[:4]), values[: 4 + 5 + 3 - 1])  # an expanding-window prefix
