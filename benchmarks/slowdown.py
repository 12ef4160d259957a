"""Does the time per network grow with its position in the run? (issue #2's slowdown ratio)

Trains every bundled series with train_many, one task per network (shard_size=1) so a network's
task time is its own, and in the same run trains them again in a plain in-process loop of the
same per-network function, for contrast. Reports, for each, the median over the last 10% of
networks (by start order) divided by the median over the first 10%:
  - task seconds (train_many only: Prefect + Dask + training, what a user waits for),
  - training seconds (the network's own fit, evaluation and checkpoint),
  - training seconds per training window (the same, corrected for series length),
  - the gap between consecutive task completions (train_many only: catches orchestration
    overhead, Prefect's or Dask's, that would grow as the run goes on).
Prints a table and writes benchmarks/results/slowdown.json. Run: `make bench` or
`python -m benchmarks.slowdown [--series N] [--epochs E]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from data import BUNDLED_SERIES
from flows.train import train_many
from models import ModelSpec
from tasks.series import load_table, validate_table
from tasks.storage import stage_values
from tasks.training import train_network_iteration, warm_up

RESULTS = Path(__file__).with_name("results")


def slowdown_ratio(values: pd.Series, positions: pd.Series) -> float:
    """Median of `values` over the last 10% of positions over that of the first 10%."""
    order = values.loc[positions.sort_values().index]
    tenth = max(1, len(order) // 10)
    return float(order.iloc[-tenth:].median() / order.iloc[:tenth].median())


def plain_loop(table: pd.DataFrame, spec: ModelSpec, output_dir: str) -> pd.DataFrame:
    """Train every valid series one after another in this process, as a user's loop would."""
    valid, _ = validate_table(table, spec)
    warm_up()
    rows = []
    for position, series in enumerate(valid):
        stage_values(output_dir, series.series_id, series.values)
        outcome = train_network_iteration(series.series_id, spec, 1, output_dir)
        rows.append({"series_id": series.series_id, "position": position, "seconds": outcome.seconds,
                     "train_windows": outcome.train_windows})  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(BUNDLED_SERIES))
    parser.add_argument("--series", type=int, default=None, help="use only the first N series")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per iteration")
    parser.add_argument("--n-workers", type=int, default=None)
    args = parser.parse_args(argv)

    table = load_table(args.data)
    if args.series:
        keep = pd.unique(table["series_id"].astype(str))[: args.series]
        table = table[table["series_id"].astype(str).isin(keep)]
    spec = ModelSpec(epochs_per_iteration=args.epochs)

    with tempfile.TemporaryDirectory(prefix="manynets-slowdown-") as scratch:
        started = time.perf_counter()
        flow_results = train_many(table, model=spec, iterations=1, shard_size=1,
                                  output_dir=f"{scratch}/flow", n_workers=args.n_workers)  # fmt: skip
        flow_seconds = time.perf_counter() - started
        tasks = pd.read_parquet(f"{scratch}/flow/tasks.parquet")
        started = time.perf_counter()
        loop_results = plain_loop(table, spec, f"{scratch}/loop")
        loop_seconds = time.perf_counter() - started

    finished = tasks["finished"].sort_values(ignore_index=True)
    gaps = finished.diff().iloc[1:]
    trained = flow_results[flow_results["status"] == "trained"].set_index("series_id")
    loop = loop_results.set_index("series_id")
    rows = {
        "train_many": {
            "networks": len(trained),
            "wall_seconds": flow_seconds,
            "task_seconds_ratio": slowdown_ratio(trained["task_seconds"], trained["position"]),
            "train_seconds_ratio": slowdown_ratio(trained["seconds"], trained["position"]),
            "seconds_per_window_ratio": slowdown_ratio(
                trained["seconds"] / trained["train_windows"], trained["position"]
            ),
            "completion_gap_ratio": slowdown_ratio(gaps, pd.Series(range(len(gaps)), index=gaps.index)),
            "median_task_seconds": float(trained["task_seconds"].median()),
        },
        "plain loop": {
            "networks": len(loop),
            "wall_seconds": loop_seconds,
            "task_seconds_ratio": None,
            "train_seconds_ratio": slowdown_ratio(loop["seconds"], loop["position"]),
            "seconds_per_window_ratio": slowdown_ratio(loop["seconds"] / loop["train_windows"], loop["position"]),
            "completion_gap_ratio": None,
            "median_task_seconds": None,
        },
    }

    view = Table(title=f"Slowdown ratios, last 10% of networks / first 10% (target <= 1.10); {args.epochs} epochs")
    columns = ("run", "networks", "wall s", "task s", "train s", "train s/window", "completion gap", "median task s")
    for column in columns:
        view.add_column(column, justify="right" if column != "run" else "left")
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    for name, row in rows.items():
        view.add_row(name, str(row["networks"]), fmt(row["wall_seconds"], ".1f"), fmt(row["task_seconds_ratio"]),
                     fmt(row["train_seconds_ratio"]), fmt(row["seconds_per_window_ratio"]),
                     fmt(row["completion_gap_ratio"]), fmt(row["median_task_seconds"]))  # fmt: skip
    Console(width=140).print(view)

    RESULTS.mkdir(exist_ok=True)
    record = {"benchmark": "slowdown", "data": args.data, "series": args.series, "epochs": args.epochs,
              "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": rows}  # fmt: skip
    (RESULTS / "slowdown.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {RESULTS / 'slowdown.json'}")


if __name__ == "__main__":
    main()
