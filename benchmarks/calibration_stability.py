"""How steady is the cost model's calibrated prior? Repeated calibrations against the time they predict.

On a LocalCluster of one single-threaded worker per core (as `make run`), the MLP spec of the main
job is calibrated `--rounds` times, fused on one worker while one-by-one calibrates on another (as
the flow does when it chooses a strategy), alternating two ways: SHAPES only, timed once
(`budget_seconds=0`, what calibration did before the fused extras and repeats), and the default
budget. Each prior predicts the first task of `make run`: half the bundled networks, every second
one longest first, fused. That task is then run for real, one half on each worker at once, and
timed with its own clock (what the cost model observes). Prints a table and writes
benchmarks/results/calibration_stability.json.
Run: `python -m benchmarks.calibration_stability [--rounds 4] [--actual-runs 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import distributed
from rich.console import Console
from rich.table import Table

from data import BUNDLED_SERIES
from flows.cluster import TorchWarmup
from models import ModelSpec
from tasks.calibration import BUDGET_SECONDS, calibrate, prior_from
from tasks.cost_model import CostModel, describe_task
from tasks.series import load_table, validate_table
from tasks.storage import stage_values
from tasks.training import train_shard_iteration

RESULTS = Path(__file__).with_name("results")


def timed_calibration(spec, strategy, shortest, longest, budget):
    started = time.perf_counter()
    observations = calibrate(spec, strategy, "cpu", shortest, longest, budget_seconds=budget)
    return observations, time.perf_counter() - started


def timed_shard(shard, ids, spec, folder):
    started = time.perf_counter()
    result = train_shard_iteration(shard, ids, spec, 1, folder, strategy="fused")
    assert all(n.status == "trained" for n in result.networks)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="calibrations per way")
    parser.add_argument("--actual-runs", type=int, default=2, help="times the predicted task is run for real")
    args = parser.parse_args(argv)
    spec = ModelSpec()
    series = validate_table(load_table(BUNDLED_SERIES), spec)[0]
    windows = {s.series_id: spec.train_windows(len(s.values)) for s in series}
    ordered = sorted(windows, key=windows.get, reverse=True)
    halves = [ordered[0::2], ordered[1::2]]
    first_task = describe_task([windows[i] for i in halves[0]], spec, "fused", "cpu")
    shortest, longest = min(windows.values()), max(windows.values())
    workers = os.cpu_count() or 1
    rows, actual = [], []
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:  # fmt: skip
        client.register_plugin(TorchWarmup(("mlp",)))
        for round_ in range(args.rounds):
            for way, budget in (("SHAPES once", 0.0), ("default budget", BUDGET_SECONDS)):
                fused = client.submit(timed_calibration, spec, "fused", shortest, longest, budget, pure=False)
                other = client.submit(timed_calibration, spec, "one_by_one", shortest, longest, budget, pure=False)
                observations, seconds = fused.result()
                other.result()
                predicted = CostModel(prior_from(observations)).predict(first_task)
                rows.append({"way": way, "round": round_, "observations": len(observations),
                             "calibration_s": seconds, "predicted_first_task_s": predicted})  # fmt: skip
                print(rows[-1], flush=True)
        with tempfile.TemporaryDirectory(prefix="manynets-calibration-bench-") as scratch:
            for run in range(args.actual_runs):
                folder = Path(scratch) / str(run)
                for item in series:
                    stage_values(folder, item.series_id, item.values)
                futures = [client.submit(timed_shard, shard, ids, spec, str(folder), pure=False)
                           for shard, ids in enumerate(halves)]  # fmt: skip
                actual.append(client.gather(futures)[0])
                print({"actual_first_task_s": actual[-1]}, flush=True)
    view = Table(title=f"Calibrated prior's prediction of the first task of `make run` ({len(halves[0])} MLPs, "
                       f"fused), against {', '.join(f'{s:.2f}' for s in actual)} s measured")  # fmt: skip
    for column in ("calibration", "rounds", "calibration s (median)", "predicted s: min", "median", "max",
                   "max / min", "median vs measured"):  # fmt: skip
        view.add_column(column, justify="right")
    summary = {}
    for way in dict.fromkeys(r["way"] for r in rows):
        predictions = [r["predicted_first_task_s"] for r in rows if r["way"] == way]
        median = statistics.median(predictions)
        summary[way] = {"min": min(predictions), "median": median, "max": max(predictions),
                        "spread": max(predictions) / min(predictions),
                        "median_vs_measured": median / statistics.median(actual)}  # fmt: skip
        view.add_row(way, str(len(predictions)),
                     f"{statistics.median(r['calibration_s'] for r in rows if r['way'] == way):.2f}",
                     f"{min(predictions):.2f}", f"{median:.2f}", f"{max(predictions):.2f}",
                     f"{summary[way]['spread']:.2f}x", f"{summary[way]['median_vs_measured']:.2f}")  # fmt: skip
    Console(width=160).print(view)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "calibration_stability.json"
    out.write_text(json.dumps({"benchmark": "calibration_stability", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "workers": workers, "first_task_networks": len(halves[0]), "rows": rows,
                               "actual_first_task_s": actual, "summary": summary}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
