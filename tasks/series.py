"""From a long table to per-series training data: load, validate, normalise, window.

Everything here is a plain function of arrays and frames; the Prefect tasks wrap it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.spec import ModelSpec

REQUIRED_COLUMNS = ("series_id", "timestamp", "value")


class DataError(ValueError):
    """The input table cannot be used at all; raised before any training starts."""


@dataclass(frozen=True)
class SeriesData:
    """One valid series, ready to ship to a worker: its id and its values in time order."""

    series_id: str
    values: np.ndarray  # float32, 1-D

    @property
    def length(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class InvalidSeries:
    """A series that will not be trained, and why."""

    series_id: str
    reason: str


@dataclass(frozen=True)
class Windows:
    """Normalised training and held-out windows of one series, plus the scale to undo it."""

    x_train: np.ndarray  # (n_train, window)
    y_train: np.ndarray  # (n_train, horizon)
    x_val: np.ndarray  # (n_val, window)
    y_val: np.ndarray  # (n_val, horizon)
    mean: float
    std: float


def load_table(data: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read a long table (series_id, timestamp, value) from parquet, CSV or a DataFrame.

    Raises DataError naming the input and what is expected when the file is missing, unreadable
    or lacks a required column.
    """
    if isinstance(data, pd.DataFrame):
        table, source = data, "the DataFrame passed as data"
    else:
        path = Path(data)
        source = str(path)
        if not path.is_file():
            raise DataError(f"data file {source} does not exist; pass a parquet or CSV file or a DataFrame")
        try:
            if path.suffix.lower() == ".csv":
                table = pd.read_csv(path)
            else:
                table = pd.read_parquet(path)
        except Exception as exc:  # any reader failure means the same thing to the user
            raise DataError(
                f"cannot read {source} as {'CSV' if path.suffix.lower() == '.csv' else 'parquet'}: {exc}. "
                "Pass a parquet file (or a .csv) with columns series_id, timestamp, value"
            ) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{source} lacks column(s) {', '.join(missing)}; a long table needs columns "
            f"{', '.join(REQUIRED_COLUMNS)} (one row per series and time step); it has {', '.join(map(str, table.columns))}"
        )
    if table.empty:
        raise DataError(f"{source} has no rows; it needs at least one series")
    value_dtype = table["value"].dtype
    if pd.api.types.is_bool_dtype(value_dtype) or pd.api.types.is_datetime64_any_dtype(value_dtype):
        raise DataError(f"{source} column value has dtype {value_dtype}; expected numbers (int or float)")
    missing_ids = table["series_id"].isna()
    if missing_ids.any():
        rows = ", ".join(map(str, table.index[missing_ids][:5]))
        raise DataError(
            f"{source} has {int(missing_ids.sum())} row(s) with no series_id (e.g. rows {rows}); "
            "drop them or give each an id"
        )
    return table


def split_series(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The table's series in first-seen order, each as (series_id, its rows); ids become strings."""
    ids = table["series_id"].map(str)
    order = pd.unique(ids)
    groups = dict(tuple(table.groupby(ids, sort=False, observed=True)))
    return [(sid, groups[sid]) for sid in order]


def validate_series(series_id: str, rows: pd.DataFrame, spec: ModelSpec) -> SeriesData | InvalidSeries:
    """Check one series' rows and return its values, or the reason it cannot be trained."""
    values = pd.to_numeric(rows["value"], errors="coerce")
    if values.isna().any() and rows["value"].notna().all():
        return InvalidSeries(series_id, "non-numeric values")
    stamps = rows["timestamp"]
    if stamps.isna().any():
        return InvalidSeries(series_id, f"{int(stamps.isna().sum())} missing timestamp(s)")
    if pd.api.types.is_object_dtype(stamps) or pd.api.types.is_string_dtype(stamps):
        kinds = sorted({type(v).__name__ for v in stamps})
        if len(kinds) > 1:
            return InvalidSeries(series_id, f"timestamps of mixed types ({', '.join(kinds)}) cannot be ordered")
        if kinds == ["str"]:
            parsed = pd.to_datetime(stamps, errors="coerce", format="mixed")
            if parsed.isna().any():
                return InvalidSeries(series_id, f"unparseable timestamp(s), e.g. {stamps[parsed.isna()].iloc[0]!r}")
            stamps = parsed
    if stamps.duplicated().any():
        return InvalidSeries(series_id, "duplicated timestamps")
    if not stamps.is_monotonic_increasing:
        order = np.argsort(stamps.to_numpy(), kind="stable")
        values = values.iloc[order]
    array = values.to_numpy(dtype=np.float64)
    if np.isnan(array).any():
        return InvalidSeries(series_id, f"{int(np.isnan(array).sum())} NaN value(s)")
    if np.isinf(array).any():
        return InvalidSeries(series_id, f"{int(np.isinf(array).sum())} infinite value(s)")
    if len(array) < spec.min_length():
        return InvalidSeries(
            series_id,
            f"too short: {len(array)} points, needs >= {spec.min_length()} "
            f"(window {spec.window} + horizon {spec.horizon} + held-out tail)",
        )
    if np.ptp(array) == 0:
        return InvalidSeries(series_id, "constant series")
    if np.abs(array).max() > np.finfo(np.float32).max:
        return InvalidSeries(series_id, "values overflow float32")
    return SeriesData(series_id, array.astype(np.float32))


def validate_table(table: pd.DataFrame, spec: ModelSpec) -> tuple[list[SeriesData], list[InvalidSeries]]:
    """Validate every series of a long table: the trainable ones and the rejected ones, in table order."""
    valid: list[SeriesData] = []
    invalid: list[InvalidSeries] = []
    for series_id, rows in split_series(table):
        checked = validate_series(series_id, rows, spec)
        (valid if isinstance(checked, SeriesData) else invalid).append(checked)
    return valid, invalid


def sliding_windows(values: np.ndarray, window: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """All (input, target) pairs of consecutive values: inputs of `window`, targets of `horizon`."""
    if len(values) < window + horizon:
        empty = np.empty((0, window), values.dtype), np.empty((0, horizon), values.dtype)
        return empty
    pairs = np.lib.stride_tricks.sliding_window_view(values, window + horizon)
    return pairs[:, :window], pairs[:, window:]


def window_values(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The consecutive values whose sliding windows are `x` and `y` (as sliding_windows makes them; >= 1 row).

    Row i of x is values[i : i + window] and row i of y values[i + window : i + window + horizon],
    so x's first column and the last pair give every value back without copying any window.
    """
    return np.concatenate([x[:, 0], x[-1, 1:], y[-1]])


def make_windows(values: np.ndarray, spec: ModelSpec) -> Windows:
    """Normalised windows of one series: training targets before the held-out tail, validation in it.

    The mean and std come from the training part only, so nothing of the tail leaks into training.
    Validation windows may read inputs from before the tail; their targets lie wholly inside it.
    """
    holdout = spec.holdout_points(len(values))
    train_part = values[: len(values) - holdout]
    mean = float(train_part.mean())
    std = float(train_part.std()) or 1.0
    scaled = ((values - mean) / std).astype(np.float32)
    x_train, y_train = sliding_windows(scaled[: len(values) - holdout], spec.window, spec.horizon)
    x_val, y_val = sliding_windows(scaled[len(values) - holdout - spec.window :], spec.window, spec.horizon)
    return Windows(x_train, y_train, x_val, y_val, mean, std)


def for_iteration(windows: Windows, spec: ModelSpec, iteration: int) -> Windows:
    """The windows iteration `iteration` trains on: all, or its expanding-window prefix (oldest first)."""
    rows = spec.training_rows(windows.x_train.shape[0], iteration)
    if rows == windows.x_train.shape[0]:
        return windows
    return dataclasses.replace(windows, x_train=windows.x_train[:rows], y_train=windows.y_train[:rows])


def series_architectures(table: pd.DataFrame, allowed: tuple[str, ...]) -> dict[str, str]:
    """Per-series architectures from the table's optional `architecture` column ({} without one).

    Raises DataError naming the series when a value is not one of `allowed` or a series has more
    than one; a series whose cells are all empty keeps the run's architecture.
    """
    if "architecture" not in table.columns:
        return {}
    frame = pd.DataFrame({"series_id": table["series_id"].map(str), "architecture": table["architecture"]}).dropna()
    frame["architecture"] = frame["architecture"].map(lambda v: str(v).strip().lower())
    bad = frame[~frame["architecture"].isin(allowed)]
    if len(bad):
        row = bad.iloc[0]
        raise DataError(
            f"column architecture has {row['architecture']!r} for series {row['series_id']!r}; "
            f"use one of {', '.join(allowed)} (or leave it empty for the run's model)"
        )
    kinds = frame.drop_duplicates().groupby("series_id", sort=False)["architecture"]
    mixed = kinds.nunique()
    if (mixed > 1).any():
        series_id = mixed[mixed > 1].index[0]
        raise DataError(
            f"series {series_id!r} has more than one architecture in column architecture "
            f"({', '.join(sorted(kinds.get_group(series_id)))}); give each series one"
        )
    return kinds.first().to_dict()
