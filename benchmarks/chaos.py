"""Kill a random busy worker every ~20 s during a full run: is anything lost, and what does it cost?

Starts a real Dask scheduler and nanny-managed workers (the nanny restarts a killed worker), runs
train_many undisturbed, then runs it again from scratch while a killer SIGKILLs a busy worker
every `--kill-every` seconds (±25% jitter). Reports networks completed / expected, iterations
redone (started but lost with a killed worker, and any checkpointed twice, from the per-network
journals), the largest difference in validation loss from the undisturbed run, and the time
overhead. Prints a table and writes benchmarks/results/chaos.json.
Run: `python -m benchmarks.chaos [--series N] [--kill-every S]`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from data import BUNDLED_SERIES
from flows.train import train_many
from tasks.series import load_table
from tasks.storage import network_dir, read_journal
from tests.dask_processes import DaskProcesses

RESULTS = Path(__file__).with_name("results")


def journal_counts(output_dir: str, series_ids) -> tuple[Counter, Counter]:
    """(starts, dones) per (network, iteration) from the journals."""
    starts, dones = Counter(), Counter()
    for series_id in series_ids:
        for event in read_journal(network_dir(output_dir, series_id)):
            (starts if event["event"] == "start" else dones)[(series_id, event["iteration"])] += 1
    return starts, dones


def timed_run(table, output_dir: str, folder: Path, args, kill_every: float | None) -> dict:
    kills: list = []
    stop = threading.Event()
    with DaskProcesses(folder, n_workers=args.n_workers) as cluster:

        def killer() -> None:
            rng = random.Random(0)
            while not stop.wait(kill_every * rng.uniform(0.75, 1.25)):
                victim = cluster.kill_busy_worker(rng)
                if victim:
                    kills.append(victim)

        if kill_every:
            threading.Thread(target=killer, daemon=True).start()
        started = time.perf_counter()
        results = train_many(table, model={"epochs_per_iteration": args.epochs}, iterations=args.iterations,
                             shard_size=args.shard_size, output_dir=output_dir,
                             cluster_address=cluster.address)  # fmt: skip
        seconds = time.perf_counter() - started
        stop.set()
    return {"results": results.set_index("series_id"), "seconds": seconds, "kills": len(kills)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(BUNDLED_SERIES))
    parser.add_argument("--series", type=int, default=None, help="use only the first N series")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--n-workers", type=int, default=2)
    args = parser.parse_args(argv)

    table = load_table(args.data)
    if args.series:
        keep = pd.unique(table["series_id"].astype(str))[: args.series]
        table = table[table["series_id"].astype(str).isin(keep)]
    with tempfile.TemporaryDirectory(prefix="manynets-chaos-") as scratch:
        calm = timed_run(table, f"{scratch}/calm", Path(scratch) / "dask-calm", args, None)
        chaos = timed_run(table, f"{scratch}/chaos", Path(scratch) / "dask-chaos", args, args.kill_every)
        valid = calm["results"].index[calm["results"]["status"] != "invalid"]
        starts, dones = journal_counts(f"{scratch}/chaos", valid)

    done = chaos["results"].loc[valid]
    completed = int(((done["status"] == "trained") & (done["iterations_done"] == args.iterations)).sum())
    row = {
        "networks_expected": len(valid),
        "networks_completed": completed,
        "kills": chaos["kills"],
        "iterations_lost_in_flight": sum(starts.values()) - sum(dones.values()),
        "iterations_checkpointed_twice": sum(n - 1 for n in dones.values() if n > 1),
        "max_abs_val_loss_diff": float((done["val_loss"] - calm["results"].loc[valid, "val_loss"]).abs().max()),
        "undisturbed_seconds": calm["seconds"],
        "chaos_seconds": chaos["seconds"],
        "time_overhead": chaos["seconds"] / calm["seconds"] - 1,
    }
    view = Table(title=f"Chaos: a busy worker SIGKILLed every ~{args.kill_every:.0f} s, {args.n_workers} workers")
    for key, value in row.items():
        view.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    Console(width=120).print(view)
    RESULTS.mkdir(exist_ok=True)
    record = {"benchmark": "chaos", "args": vars(args), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    (RESULTS / "chaos.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {RESULTS / 'chaos.json'}")


if __name__ == "__main__":
    main()
