"""Every kind of bad input named and contained: per-network `invalid` with a reason, or a clear early error.

Each case is a table holding one good series ("ok") and the bad thing; the good one must still be
trainable wherever the bad thing is per-series.
"""

import numpy as np
import pandas as pd
import pytest

from models import ModelSpec
from tasks.series import DataError, load_table, validate_table
from tasks.storage import network_dir
from tests.conftest import series_frame

SPEC = ModelSpec(window=8, horizon=2)
GOOD = series_frame("ok", np.sin(np.arange(60) / 3))


def with_good(*frames):
    return pd.concat([GOOD, *frames], ignore_index=True)


def frame(series_id, timestamps, values):
    return pd.DataFrame({"series_id": series_id, "timestamp": timestamps, "value": values})


DAYS = list(pd.date_range("2026-01-01", periods=60))
PER_SERIES = {
    "NaN value": (with_good(series_frame("bad", [np.nan] + list(range(59)))), "1 NaN value(s)"),
    "inf value": (with_good(series_frame("bad", [np.inf] + list(range(59)))), "1 infinite value(s)"),
    "too short": (with_good(series_frame("bad", range(5))), "too short: 5 points, needs >= 12 (window 8 + horizon 2 + held-out tail)"),
    "constant": (with_good(series_frame("bad", [7.0] * 60)), "constant series"),
    "non-numeric values": (with_good(series_frame("bad", ["n/a"] + [str(i) for i in range(59)])), "non-numeric values"),
    "duplicated timestamps": (with_good(frame("bad", DAYS[:59] + DAYS[:1], range(60))), "duplicated timestamps"),
    "missing timestamps": (with_good(frame("bad", DAYS[:59] + [None], range(60))), "1 missing timestamp(s)"),
    "mixed-type timestamps": (with_good(frame("bad", [1, "2026-01-02"] + list(range(3, 61)), range(60))),
                              "timestamps of mixed types (int, str) cannot be ordered"),
    "unparseable timestamps": (with_good(frame("bad", ["someday"] + [f"2026-03-{d:02d}" for d in range(1, 32)]
                                               + [f"2026-04-{d:02d}" for d in range(1, 29)], range(60))),
                               "unparseable timestamp(s), e.g. 'someday'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PER_SERIES))
def test_a_bad_series_is_invalid_with_its_reason_and_the_good_one_trains(case):
    table, reason = PER_SERIES[case]
    valid, invalid = validate_table(load_table(table), SPEC)
    assert [s.series_id for s in valid] == ["ok"]
    assert [(bad.series_id, bad.reason) for bad in invalid] == [("bad", reason)]


FILE_LEVEL = {
    "missing column": (pd.DataFrame({"series_id": ["a"], "value": [1.0]}), "lacks column(s) timestamp"),
    "empty table": (pd.DataFrame({"series_id": [], "timestamp": [], "value": []}), "has no rows"),
    "boolean values": (frame("a", DAYS[:3], [True, False, True]), "column value has dtype bool; expected numbers"),
    "datetime values": (frame("a", DAYS[:3], DAYS[:3]), "column value has dtype datetime64"),
    "rows without series_id": (pd.concat([GOOD, frame(None, DAYS[:2], [1.0, 2.0])], ignore_index=True),
                               "2 row(s) with no series_id (e.g. rows 60, 61); drop them or give each an id"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FILE_LEVEL))
def test_a_bad_table_fails_early_naming_the_problem(case):
    table, message = FILE_LEVEL[case]
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_table(table)


@pytest.mark.parametrize("name, content", [("series.json", b'{"a": 1}'), ("series.parquet", b"PK\x03\x04 zip")])
def test_a_file_that_is_not_parquet_or_csv_fails_early(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"cannot read .*{name} as parquet.*Pass a parquet file"):
        load_table(path)


def test_numeric_strings_unsorted_timestamps_and_integer_ids_are_accepted():
    shuffled = series_frame(17, [str(v) for v in np.sin(np.arange(60) / 3)]).sample(frac=1, random_state=1)
    valid, invalid = validate_table(load_table(shuffled), SPEC)
    assert invalid == [] and [s.series_id for s in valid] == ["17"]
    np.testing.assert_allclose(valid[0].values, np.sin(np.arange(60) / 3), rtol=1e-6)


@pytest.mark.parametrize("series_id", ["../x", "a/b", "/abs", ".."])
def test_series_ids_with_path_characters_train_inside_the_output_dir(tmp_path, series_id):
    valid, _ = validate_table(load_table(with_good(series_frame(series_id, np.arange(60.0) ** 0.5))), SPEC)
    assert series_id in [s.series_id for s in valid]
    assert network_dir(tmp_path, series_id).resolve().is_relative_to((tmp_path / "networks").resolve())
