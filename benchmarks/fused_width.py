"""How wide a fused group should be: one fused iteration of N networks trained in groups of W, per width.

The engine trains a fused shard as consecutive groups of at most `tasks.fused.fused_width` networks;
this times one iteration of the first N bundled series (one thread, checkpoints included) with that
width replaced by each W given, so the cap is a measurement, not a guess. `--eager-too` times each width
again right after with the stacked models' compiled code switched off (models/native.py), side by side.
Prints a table and writes benchmarks/results/fused_width.json (or --output).
Run: `python -m benchmarks.fused_width [--architecture mlp] [--networks 1660] [--epochs 5] [--widths 1660 256 64 16]
[--eager-too]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

import tasks.fused
from data import BUNDLED_SERIES
from models import ModelSpec
from models.stacked import StackedNetworks
from tasks.allocator import keep_freed_memory
from tasks.series import load_table, validate_table
from tasks.storage import stage_values
from tasks.training import train_shard_iteration, warm_up

RESULTS = Path(__file__).with_name("results")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="mlp")
    parser.add_argument("--networks", type=int, default=1660)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--widths", type=int, nargs="+", default=[1660, 256, 64, 16],
                        help="a width given twice is timed twice (this machine is noisy)")
    parser.add_argument("--eager-too", action="store_true", help="also time each width with the compiled code off")
    parser.add_argument("--output", default="fused_width.json", help="file name under benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()  # as on a Dask worker
    spec = ModelSpec(architecture=args.architecture, epochs_per_iteration=args.epochs)
    series = validate_table(load_table(BUNDLED_SERIES), spec)[0][: args.networks]
    warm_up()
    rows = []
    for width in args.widths:
        for compiled in [True, False] if args.eager_too else [True]:
            with tempfile.TemporaryDirectory(prefix="manynets-width-") as scratch, contextlib.ExitStack() as patches:
                for item in series:
                    stage_values(scratch, item.series_id, item.values)
                patches.enter_context(mock.patch.object(tasks.fused, "fused_width", lambda arch, device, w=width: w))
                patches.enter_context(mock.patch.object(StackedNetworks, "use_compiled", compiled))
                started = time.perf_counter()
                result = train_shard_iteration(0, [s.series_id for s in series], spec, 1, scratch, strategy="fused")
                seconds = time.perf_counter() - started
            assert all(n.status == "trained" for n in result.networks)
            rows.append({"architecture": args.architecture, "networks": len(series), "epochs": args.epochs,
                         "width": width, "compiled": compiled, "seconds": seconds})  # fmt: skip
            print(rows[-1], flush=True)
    view = Table(title=f"one fused iteration of {len(series)} {args.architecture} networks, {args.epochs} epochs, 1 thread")
    for column in ("group width", "layers", "seconds", "vs widest"):
        view.add_column(column, justify="right")
    for r in rows:
        widest = max((o for o in rows if o["compiled"] == r["compiled"]), key=lambda o: o["width"])["seconds"]
        view.add_row(str(r["width"]), "compiled" if r["compiled"] else "eager", f"{r['seconds']:.1f}",
                     f"{widest / r['seconds']:.2f}x")
    Console(width=120).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(
        {"benchmark": "fused_width", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {RESULTS / args.output}")


if __name__ == "__main__":
    main()
