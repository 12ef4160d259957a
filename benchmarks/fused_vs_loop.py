"""Fused vs one-by-one vs a plain loop: seconds to train N networks one iteration (issue #5, MLP so far).

Three ways, in one process and one thread, on the first N bundled series (default spec: MLP 32x2,
window 32, horizon 8, batch 128, 5 epochs):
  - plain loop: what a user writes (fresh nn.Sequential + Adam per series, shuffled mini-batches,
    evaluation), no checkpoints;
  - engine one-by-one: tasks.training.train_shard_iteration(strategy="one_by_one"), checkpoints included;
  - engine fused: the same with strategy="fused" (all N networks in one shard), checkpoints included.
With --short, instead: the short-series fleet (3000 series of 20-150 points, window 8, horizon 2),
timed end to end: `train_many` from call to results (Prefect, a LocalCluster of 2 workers, staging,
checkpoints and reports included; strategy fused) against the plain loop, at 10 and 100 epochs.
Prints a table and writes benchmarks/results/fused_vs_loop.json (or fused_short_series.json).
Run: `python -m benchmarks.fused_vs_loop [--sizes 64 256 1660] [--epochs E] [--short]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from data import BUNDLED_SERIES
from models import ModelSpec
from tasks.series import load_table, make_windows, validate_table
from tasks.storage import stage_values
from tasks.training import train_shard_iteration, warm_up

RESULTS = Path(__file__).with_name("results")


def plain_loop(series, spec: ModelSpec) -> float:
    """The user's loop: one fresh model and optimizer per series, trained and evaluated in turn."""
    started = time.perf_counter()
    for item in series:
        w = make_windows(item.values, spec)
        x, y = torch.tensor(w.x_train), torch.tensor(w.y_train)
        model = nn.Sequential(nn.Linear(spec.window, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, spec.hidden),
                              nn.ReLU(), nn.Linear(spec.hidden, spec.horizon))  # fmt: skip
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
        for _ in range(spec.epochs_per_iteration):
            order = torch.randperm(len(x))
            for start in range(0, len(x), spec.batch_size):
                idx = order[start : start + spec.batch_size]
                loss = F.mse_loss(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            F.mse_loss(model(torch.tensor(w.x_val)), torch.tensor(w.y_val)).item()
    return time.perf_counter() - started


def engine(series, spec: ModelSpec, strategy: str) -> float:
    """train_shard_iteration over all the series as one shard, staged data and checkpoints included."""
    with tempfile.TemporaryDirectory(prefix="manynets-fused-") as scratch:
        for item in series:
            stage_values(scratch, item.series_id, item.values)
        started = time.perf_counter()
        result = train_shard_iteration(0, [s.series_id for s in series], spec, 1, scratch, strategy=strategy)
        seconds = time.perf_counter() - started
    assert all(n.status == "trained" for n in result.networks), [n.error for n in result.networks if n.error]
    return seconds


def short_series(epoch_counts: list[int], n_series: int, shard_size: int) -> None:
    """The short-series fleet end to end: train_many (fused) against the plain loop."""
    from data.generate import generate_table
    from flows.train import train_many

    table = generate_table(n_series, min_length=20, max_length=150, seed=7)
    rows = []
    for epochs in epoch_counts:
        spec = ModelSpec(window=8, horizon=2, epochs_per_iteration=epochs)
        valid, _ = validate_table(table, spec)
        with tempfile.TemporaryDirectory(prefix="manynets-short-") as scratch:
            started = time.perf_counter()
            results = train_many(table, model=spec, iterations=1, shard_size=shard_size, output_dir=scratch,
                                 n_workers=2, strategy="fused", progress_bar=False)  # fmt: skip
            flow_seconds = time.perf_counter() - started
        assert (results["status"] == "trained").sum() == len(valid)
        torch.set_num_threads(1)
        loop_seconds = plain_loop(valid, spec)
        torch.set_num_threads(torch.get_num_interop_threads())
        rows.append({"series": n_series, "valid": len(valid), "epochs": epochs, "shard_size": shard_size,
                     "plain_loop_s": loop_seconds, "train_many_fused_s": flow_seconds,
                     "speedup": loop_seconds / flow_seconds})  # fmt: skip
        print(rows[-1], flush=True)
    view = Table(title=f"{n_series} short series (20-150 points), MLP, end to end")
    for column in ("epochs", "networks", "plain loop s", "train_many fused s", "speedup"):
        view.add_column(column, justify="right")
    for r in rows:
        view.add_row(str(r["epochs"]), str(r["valid"]), f"{r['plain_loop_s']:.1f}", f"{r['train_many_fused_s']:.1f}",
                     f"{r['speedup']:.2f}x")  # fmt: skip
    Console(width=140).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_short_series.json").write_text(json.dumps(
        {"benchmark": "fused_short_series", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))
    print(f"wrote {RESULTS / 'fused_short_series.json'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1660])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--short", action="store_true", help="the short-series fleet, end to end")
    parser.add_argument("--short-series", type=int, default=3000)
    parser.add_argument("--short-epochs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--shard-size", type=int, default=250, help="with --short: networks per task")
    args = parser.parse_args(argv)
    if args.short:
        short_series(args.short_epochs, args.short_series, args.shard_size)
        return
    torch.set_num_threads(1)  # as on a Dask worker: parallelism comes from workers, not threads
    spec = ModelSpec(epochs_per_iteration=args.epochs)
    table = load_table(BUNDLED_SERIES)
    valid, _ = validate_table(table, spec)
    warm_up()
    rows = []
    for n in args.sizes:
        series = valid[:n]
        windows = sum(len(make_windows(s.values, spec).x_train) for s in series) * args.epochs
        loop = plain_loop(series, spec)
        one_by_one = engine(series, spec, "one_by_one")
        fused = engine(series, spec, "fused")
        rows.append({"networks": n, "samples": windows, "plain_loop_s": loop, "one_by_one_s": one_by_one,
                     "fused_s": fused, "fused_samples_per_s": windows / fused, "fused_speedup_vs_loop": loop / fused,
                     "one_by_one_speedup_vs_loop": loop / one_by_one})  # fmt: skip
        print(rows[-1], flush=True)
    view = Table(title=f"MLP, {args.epochs} epochs, 1 thread: seconds for one iteration of N networks")
    for column in ("networks", "samples", "plain loop s", "one-by-one s", "fused s", "fused samples/s",
                   "fused vs loop", "one-by-one vs loop"):  # fmt: skip
        view.add_column(column, justify="right")
    for r in rows:
        view.add_row(str(r["networks"]), str(r["samples"]), f"{r['plain_loop_s']:.1f}", f"{r['one_by_one_s']:.1f}",
                     f"{r['fused_s']:.1f}", f"{r['fused_samples_per_s']:.0f}", f"{r['fused_speedup_vs_loop']:.2f}x",
                     f"{r['one_by_one_speedup_vs_loop']:.2f}x")  # fmt: skip
    Console(width=140).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fused_vs_loop.json").write_text(json.dumps(
        {"benchmark": "fused_vs_loop", "architecture": "mlp", "epochs": args.epochs,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {RESULTS / 'fused_vs_loop.json'}")


if __name__ == "__main__":
    main()
