"""Where a fused iteration's seconds go: its phases, timed on N networks in one group (issue #5).

On a GPU the fused steps of 1660 networks take about a second, so the host's work around them
(reading the staged data, drawing fresh weights, encoding and writing 1660 checkpoints) decides
the speedup; this prints each phase, for each architecture:
  - prepare: from the call to the first fused step (listing checkpoints, reading data, drawing weights);
  - train: the fused epochs, validation included (the device is waited for at each epoch's end);
  - bodies: encoding every network's checkpoint (tasks.storage.checkpoint_bodies);
  - writes after: waiting for the checkpoint writer threads once training is done;
  - engine: the whole call, as benchmarks.fused_vs_loop times it (the phases and the outcomes' assembly).
The networks are held in one group on every device, so the phases compare across devices and
architectures (the engine itself trains LSTMs on a GPU in groups of 415, whose phases overlap:
one group's checkpoints are written while the next trains).
Run: `python -m benchmarks.fused_phases [--device cuda] [--architectures mlp lstm] [--networks 1660]
[--epochs 5] [--other-epochs 1] [--repeats 2]`; writes benchmarks/results/fused_phases_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tasks.fused
from benchmarks.fused_vs_loop import RESULTS, engine
from data import BUNDLED_SERIES
from models import ModelSpec
from tasks.allocator import keep_freed_memory
from tasks.series import load_table, validate_table
from tasks.training import warm_up


def time_phases() -> dict[str, float]:
    """Wrap the fused path's phase boundaries with clocks; returns the dict they fill (perf_counter stamps)."""
    marks: dict[str, float] = {}

    def stamped(owner, name: str, before: str | None, after: str | None):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if before:
                marks[before] = time.perf_counter()
            result = inner(*args, **kwargs)
            if after:
                marks[after] = time.perf_counter()
            return result

        setattr(owner, name, wrapper)

    stamped(tasks.fused, "train_fusable_part", "call", None)
    stamped(tasks.fused, "train_fused_iteration", "train_start", "iteration_done")
    stamped(tasks.fused, "checkpoint_bodies", "bodies_start", "bodies_done")
    stamped(tasks.fused.CheckpointWriters, "__exit__", None, "writes_done")
    tasks.fused.fused_width = lambda architecture, device: None  # one group: phases that do not overlap
    return marks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--architectures", nargs="+", default=["mlp", "lstm"])
    parser.add_argument("--networks", type=int, default=1660)
    parser.add_argument("--epochs", type=int, default=5, help="epochs for the MLP")
    parser.add_argument("--other-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()
    warm_up(args.device)
    table = load_table(BUNDLED_SERIES)
    marks = time_phases()
    rows = []
    for architecture in args.architectures:
        epochs = args.epochs if architecture == "mlp" else args.other_epochs
        spec = ModelSpec(architecture=architecture, epochs_per_iteration=epochs)
        series = validate_table(table, spec)[0][: args.networks]
        engine(series[:8], spec, "fused", args.device)  # first-call costs out of the timings
        for _ in range(args.repeats):
            marks.clear()
            seconds = engine(series, spec, "fused", args.device)
            row = {"architecture": architecture, "networks": len(series), "epochs": epochs, "device": args.device,
                   "prepare_s": marks["train_start"] - marks["call"],
                   "train_s": marks["bodies_start"] - marks["train_start"],
                   "bodies_s": marks["bodies_done"] - marks["bodies_start"],
                   "writes_after_s": marks["writes_done"] - marks["iteration_done"], "engine_s": seconds}  # fmt: skip
            rows.append(row)
            print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fused_phases_{args.device.replace(':', '')}.json"
    path.write_text(json.dumps({"benchmark": "fused_phases", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
