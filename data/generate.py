"""Write N synthetic series of varied lengths to a long-format parquet file.

Each series mixes a level, a trend, one or two seasonalities and AR(1) noise, drawn from its own
seeded generator, so the same arguments always write the same table. Run as
`python -m data.generate --series 1660 --out data/series.parquet`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def synthetic_series(length: int, rng: np.random.Generator) -> np.ndarray:
    """One series of `length` points: level + trend + seasonality + AR(1) noise."""
    t = np.arange(length, dtype=np.float64)
    level = rng.uniform(20, 200)
    trend = rng.uniform(-0.02, 0.02) * level / 100
    values = level + trend * t
    for period in rng.choice([7, 24, 30, 52, 365], size=rng.integers(1, 3), replace=False):
        amplitude = rng.uniform(0.02, 0.3) * level
        values += amplitude * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))
    noise = np.empty(length)
    phi, scale = rng.uniform(0, 0.8), rng.uniform(0.01, 0.1) * level
    noise[0] = rng.normal(0, scale)
    for i in range(1, length):
        noise[i] = phi * noise[i - 1] + rng.normal(0, scale)
    return values + noise


def generate_table(
    n_series: int, min_length: int = 200, max_length: int = 5000, seed: int = 0, decimals: int = 1
) -> pd.DataFrame:
    """A long table (series_id, timestamp, value) of `n_series` series with log-uniform lengths.

    Lengths are log-uniform in [min_length, max_length] so short and long series are both common;
    every series ends on the same day, as a fleet's history usually does. Values are rounded to
    `decimals` places to keep the bundled file small.
    """
    if n_series < 1 or not 1 <= min_length <= max_length:
        raise ValueError(
            f"need n_series >= 1 and 1 <= min_length <= max_length; got {n_series}, {min_length}, {max_length}"
        )
    master = np.random.default_rng(seed)
    lengths = np.exp(master.uniform(np.log(min_length), np.log(max_length + 1), size=n_series)).astype(int)
    end = pd.Timestamp("2026-10-31")
    frames = []
    width = len(str(n_series - 1))
    for i, length in enumerate(lengths):
        rng = np.random.default_rng([seed, i])
        values = np.round(synthetic_series(int(length), rng), decimals).astype(np.float32)
        frames.append(
            pd.DataFrame(
                {
                    "series_id": f"s{i:0{width}d}",
                    "timestamp": pd.date_range(end=end, periods=int(length), freq="D"),
                    "value": values,
                }
            )
        )
    table = pd.concat(frames, ignore_index=True)
    table["series_id"] = table["series_id"].astype("category")
    return table


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write `table` to parquet, compressed for committing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Noise is most of the bytes; these encodings keep 1660 series near 4.7 MB.
    pq.write_table(
        pa.Table.from_pandas(table, preserve_index=False),
        path,
        compression="zstd",
        compression_level=19,
        use_dictionary=["series_id"],
        column_encoding={"timestamp": "DELTA_BINARY_PACKED", "value": "BYTE_STREAM_SPLIT"},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1660, help="number of series")
    parser.add_argument("--min-length", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/series.parquet"))
    args = parser.parse_args(argv)
    table = generate_table(args.series, args.min_length, args.max_length, args.seed)
    write_table(table, args.out)
    print(f"wrote {table['series_id'].nunique()} series, {len(table)} rows to {args.out}")


if __name__ == "__main__":
    main()
