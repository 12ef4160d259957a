"""Data: the synthetic-series generator and the bundled default fleet."""

from pathlib import Path

BUNDLED_SERIES = Path(__file__).with_name("series.parquet")

__all__ = ["BUNDLED_SERIES"]
