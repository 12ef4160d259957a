"""FIFO vs cost-model priorities vs full cost-model planning on a skewed workload (issue #3).

One run, three ways, each a full `train_many` on a LocalCluster of 2 single-threaded workers:
  - fifo: fixed shards of 32 in input order, no priorities (Dask runs tasks as submitted);
  - priorities: the same shards, each task submitted with the priority of its shard's predicted
    remaining chain (longest first);
  - planned: shard_size="auto" (cost-model packing, shard count chosen by simulation) + priorities.
The workload: series lengths spread 25x (log-uniform 200-5000 points), a third of them LSTMs (the
`architecture` column), the rest MLPs, expanding window (iteration k trains on min(1, k/4) of
each series), 4 iterations of 2 epochs. Each run reports its makespan, its lower bound
max(total task seconds / workers, longest shard chain) and the cost model's median absolute
percentage error after the first iteration (schedule.json).

Then a simulation replays the workload on virtual clusters of M = 2..256 workers: 1660 networks
drawn from the same distribution, task costs from the cost model fitted to every task recorded
above, the per-task overhead as measured; each policy is list-scheduled as Dask would run it.

Prints two tables and writes benchmarks/results/scheduling.json.
Run: `python -m benchmarks.scheduling [--series 240] [--simulate-only]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from data.generate import generate_table
from models import ModelSpec
from tasks.cost_model import CostModel
from tasks.schedule import lower_bound, makespan, simulate
from tasks.shards import NetworkLoad, chain_costs, group_by_spec, plan_auto_shards, plan_fixed_shards

RESULTS = Path(__file__).with_name("results")
SPEC = {"hidden": 32, "layers": 2, "window": 32, "horizon": 8, "epochs_per_iteration": 2, "batch_size": 128,
        "expanding_window": True, "expanding_start": 0.25}  # fmt: skip
ITERATIONS = 4
FIXED_SHARD = 32
POLICIES = {  # name: (shard_size, priorities)
    "fifo": (FIXED_SHARD, False),
    "priorities": (FIXED_SHARD, True),
    "planned": ("auto", True),
}


def workload(series: int, seed: int = 3) -> pd.DataFrame:
    """Lengths log-uniform over 200-5000 points; every series has a 1-in-3 chance of being an LSTM."""
    table = generate_table(series, min_length=200, max_length=5000, seed=seed)
    rng = np.random.default_rng(seed)
    ids = pd.unique(table["series_id"])
    lstm = dict(zip(ids, rng.random(len(ids)) < 1 / 3))
    table["architecture"] = np.where(table["series_id"].map(lstm), "lstm", "mlp")
    return table


def run_policies(table: pd.DataFrame, root: Path) -> dict[str, dict]:
    from flows.train import train_many

    runs = {}
    for name, (shard_size, priorities) in POLICIES.items():
        started = time.perf_counter()
        results = train_many(table, model=SPEC, iterations=ITERATIONS, shard_size=shard_size, priorities=priorities,
                             output_dir=str(root / name), n_workers=2, progress_bar=False)  # fmt: skip
        wall = time.perf_counter() - started
        assert (results["status"] == "trained").all(), results["status"].value_counts()
        schedule = json.loads((root / name / "schedule.json").read_text())
        runs[name] = {**schedule, "flow_seconds": wall}
    return runs


def fitted_model(root: Path) -> tuple[CostModel, float]:
    """The cost model fitted on every task the three runs recorded, and their median overhead gap."""
    from tasks.cost_model import load_history

    history = pd.concat([load_history(root / name) for name in POLICIES], ignore_index=True)
    gaps = [json.loads((root / n / "schedule.json").read_text())["median_overhead_gap_seconds"] for n in POLICIES]
    return CostModel.from_history(history), float(np.nanmedian([g for g in gaps if g is not None]))


def simulate_policies(model: CostModel, overhead: float, networks: int, workers: list[int]) -> list[dict]:
    """Makespans of the three policies on virtual clusters, with costs from `model`."""
    rng = np.random.default_rng(11)
    mlp, lstm = ModelSpec(**SPEC), ModelSpec(**{**SPEC, "architecture": "lstm"})
    lengths = np.exp(rng.uniform(np.log(200), np.log(5000), networks)).astype(int)
    loads = [NetworkLoad(f"v{i}", lstm if rng.random() < 1 / 3 else mlp, mlp.train_windows(int(n)))
             for i, n in enumerate(lengths)]  # fmt: skip
    by_id = {n.series_id: n for n in loads}
    fixed = []
    for spec, members in group_by_spec(loads).items():
        fixed += plan_fixed_shards([m.series_id for m in members], FIXED_SHARD, spec, len(fixed))
    fixed_chains = [chain_costs([by_id[i] for i in s.series_ids], ITERATIONS, model, overhead, "one_by_one", "cpu")
                    for s in fixed]  # fmt: skip
    rows = []
    for m in workers:
        planned, _ = plan_auto_shards(loads, ITERATIONS, m, model, overhead, "one_by_one", "cpu")
        planned_chains = [chain_costs([by_id[i] for i in s.series_ids], ITERATIONS, model, overhead, "one_by_one",
                                      "cpu") for s in planned]  # fmt: skip
        row = {"workers": m, "planned_shards": len(planned)}
        for name, chains, policy in (("fifo", fixed_chains, "fifo"), ("priorities", fixed_chains, "priority"),
                                     ("planned", planned_chains, "priority")):  # fmt: skip
            row[f"{name}_makespan"] = makespan(simulate(chains, m, policy))
            row[f"{name}_bound"] = lower_bound(chains, m)
        # No plan can beat this: all work spread evenly, or one network's whole chain, plus one overhead a task.
        solo = [sum(chain_costs([n], ITERATIONS, model, overhead, "one_by_one", "cpu")) for n in loads]
        row["network_bound"] = max(sum(sum(c) for c in planned_chains) / m, max(solo))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=240)
    parser.add_argument("--simulate-only", type=Path, default=None, metavar="RUN_ROOT",
                        help="skip the runs; simulate from a folder holding fifo/, priorities/, planned/")
    args = parser.parse_args(argv)
    console = Console()
    out: dict = {"spec": SPEC, "iterations": ITERATIONS, "series": args.series}
    with tempfile.TemporaryDirectory(prefix="manynets-scheduling-") as scratch:
        root = args.simulate_only or Path(scratch)
        if args.simulate_only is None:
            out["runs"] = run_policies(workload(args.series), root)
            table = Table(title=f"{args.series} series, 25x lengths, 1/3 LSTM, expanding window, "
                                f"{ITERATIONS} iterations, 2 workers")  # fmt: skip
            for column in ("policy", "shards", "tasks", "makespan s", "lower bound s", "makespan / bound",
                           "vs fifo", "MAPE iter>=2 %", "flow s"):  # fmt: skip
                table.add_column(column, justify="right")
            fifo = out["runs"]["fifo"]["makespan_seconds"]
            for name, run in out["runs"].items():
                mape = run.get("mape_after_first_iteration_percent")
                table.add_row(name, str(run["shards"]), str(run["tasks"]), f"{run['makespan_seconds']:.1f}",
                              f"{run['lower_bound_seconds']:.1f}", f"{run['makespan_over_bound']:.3f}",
                              f"{run['makespan_seconds'] / fifo - 1:+.1%}", "-" if mape is None else f"{mape:.1f}",
                              f"{run['flow_seconds']:.1f}")  # fmt: skip
            console.print(table)
        model, overhead = fitted_model(root)
        out["simulation"] = {"networks": 1660, "overhead_seconds": overhead,
                             "rows": simulate_policies(model, overhead, 1660, [2, 4, 8, 16, 32, 64, 128, 256])}
    table = Table(title=f"Simulated: 1660 networks, costs from the fitted model, overhead {overhead * 1000:.0f} ms/task")
    for column in ("workers", "planned shards", "fifo s", "priorities s", "planned s", "planned / bound",
                   "planned vs fifo"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in out["simulation"]["rows"]:
        table.add_row(str(row["workers"]), str(row["planned_shards"]), f"{row['fifo_makespan']:.1f}",
                      f"{row['priorities_makespan']:.1f}", f"{row['planned_makespan']:.1f}",
                      f"{row['planned_makespan'] / row['network_bound']:.3f}",
                      f"{row['planned_makespan'] / row['fifo_makespan'] - 1:+.1%}")  # fmt: skip
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scheduling.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    console.print(f"written {RESULTS / 'scheduling.json'}")


if __name__ == "__main__":
    main()
