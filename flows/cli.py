"""`python -m flows.cli`: run train_many from a shell and print a short summary."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from data import BUNDLED_SERIES
from flows.train import DEFAULT_OUTPUT_DIR, train_many
from models.spec import ARCHITECTURES
from tasks.results import status_counts
from tasks.training import STRATEGIES


def summary_table(results, seconds: float, output_dir: str) -> Table:
    """The few numbers a user wants after a run."""
    table = Table(title=f"train_many: {len(results)} networks in {seconds:.1f}s", show_header=False)
    for status, count in status_counts(results).items():
        table.add_row(f"networks {status}", str(count))
    trained = results[results["status"] == "trained"]
    if len(trained):
        table.add_row("median validation loss (normalised MSE)", f"{trained['val_loss'].median():.4f}")
        table.add_row("median training seconds per network", f"{trained['seconds'].median():.3f}")
    table.add_row("results", f"{output_dir}/results.parquet")
    table.add_row("tasks", f"{output_dir}/tasks.parquet")
    table.add_row("schedule and cost model", f"{output_dir}/schedule.json")
    return table


def _shard_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one network per series with manynets.")
    parser.add_argument("--data", default=str(BUNDLED_SERIES), help="parquet or CSV long table")
    parser.add_argument("--architecture", default="mlp", choices=ARCHITECTURES)
    parser.add_argument("--epochs-per-iteration", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--shard-size", type=_shard_size, default="auto",
                        help="networks per task, or 'auto' to plan shards from the cost model")
    parser.add_argument("--expanding-window", action="store_true",
                        help="iteration k trains on a growing share of each series (backtest-like)")
    parser.add_argument("--no-priorities", dest="priorities", action="store_false",
                        help="let Dask run tasks in submission order instead of longest remaining work first")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--cluster-address", default=None, help="existing Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--n-workers", type=int, default=None, help="LocalCluster workers (default: one per core)")
    parser.add_argument("--strategy", default="auto", choices=("auto",) + STRATEGIES,
                        help="train a shard's networks one after another, together, or whichever the cost "
                             "model predicts is faster (auto)")
    parser.add_argument("--device", default="auto", help="auto (CUDA where there is a GPU worker), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: forward passes under bfloat16 autocast (for GPUs)")
    parser.add_argument("--early-stopping-patience", type=int, default=None,
                        help="stop a network after this many epochs without validation improvement")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = train_many(
        args.data,
        model={"architecture": args.architecture, "epochs_per_iteration": args.epochs_per_iteration,
               "expanding_window": args.expanding_window, "precision": args.precision,
               "early_stopping_patience": args.early_stopping_patience},
        iterations=args.iterations,
        shard_size=args.shard_size,
        output_dir=args.output_dir,
        cluster_address=args.cluster_address,
        n_workers=args.n_workers,
        strategy=args.strategy,
        device=args.device,
        priorities=args.priorities,
    )
    Console().print(summary_table(results, time.perf_counter() - started, args.output_dir))


if __name__ == "__main__":
    main()
