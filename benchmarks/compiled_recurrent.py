"""The compiled stacked layers against the eager stacked ones and against a plain loop, per group width.

One training step (forward, MSE loss, backward) of K two-layer forecasters (32 wide or --hidden, window 32, batch
128; horizon 1 for LSTM/GRU/Transformer, the default 8 for the MLP), one thread, best of R: stacked with the
compiled code (models/native.py: the LSTM/GRU layer; for the MLP the engine's fused step
`StackedMLP.mse_step`; for the Transformer its first attention and residual norms), stacked eagerly
(models/stacked.py, autograd), and K single forecasters one after another (what a plain loop pays; for
LSTM/GRU oneDNN's fused RNN kernels on this CPU). The width where the compiled column per network is lowest
is what tasks.fused.fused_width should hold; the --hidden where eager overtakes compiled is what
native.MLP_MAX_WIDTH should hold (the compiled column runs compiled past it, for that). Prints a table and
writes benchmarks/results/compiled_recurrent.json (or --output).
Run: `python -m benchmarks.compiled_recurrent [--architectures lstm gru mlp transformer] [--widths 1 2 4 8 16]
[--hidden 32] [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from rich.console import Console
from rich.table import Table

from models import ModelSpec, build_model, native
from benchmarks.recurrent_backward import best_of
from models.stacked import stack
from tasks.allocator import keep_freed_memory

RESULTS = Path(__file__).with_name("results")


def measure(architecture: str, width: int, repeats: int, hidden: int = 32) -> dict:
    spec = ModelSpec(architecture=architecture, hidden=hidden, layers=2, window=32,
                     horizon=ModelSpec().horizon if architecture == "mlp" else 1)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    networks = [build_model(spec, generator) for _ in range(width)]
    compiled, eager = stack(architecture, networks), stack(architecture, networks)
    eager.use_compiled = False
    x, y = torch.randn(width, 128, spec.window), torch.randn(width, 128, spec.horizon)

    def stacked_step(model):
        model.grads.zero_()
        if model.mse_step(x, y, None, True) is None:  # the step the engine runs where there is one
            ((model(x) - y) ** 2).mean(dim=(1, 2)).sum().backward()

    def loop_step():
        for k, network in enumerate(networks):
            network.zero_grad()
            ((network(x[k]) - y[k]) ** 2).mean().backward()

    seconds = {"compiled": best_of(lambda: stacked_step(compiled), repeats),
               "eager": best_of(lambda: stacked_step(eager), repeats), "loop": best_of(loop_step, repeats)}  # fmt: skip
    return {"architecture": architecture, "width": width, "hidden": hidden,
            **{f"{k}_ms": v * 1e3 for k, v in seconds.items()},
            "eager_over_compiled": seconds["eager"] / seconds["compiled"],
            "loop_over_compiled": seconds["loop"] / seconds["compiled"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", nargs="+", default=["lstm", "gru"])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, nargs="+", default=[32], help="layer widths, each timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="compiled_recurrent.json", help="file name under benchmarks/results")
    args = parser.parse_args(argv)
    if native.load() is None:
        raise SystemExit("the compiled stacked layers could not be built here (see the warning above)")
    torch.set_num_threads(1)
    keep_freed_memory()  # as on the engine's workers
    # The compiled column runs compiled at every width, past the MLP's cap too: this is what sets the cap.
    with mock.patch.object(native, "MLP_MAX_WIDTH", sys.maxsize):
        rows = [measure(a, w, args.repeats, h) for a in args.architectures for h in args.hidden for w in args.widths]
    table = Table(title=f"one training step of K two-layer networks, 1 thread, best of {args.repeats}")
    columns = ("arch", "hidden", "K", "compiled ms", "eager ms", "loop ms", "compiled / network", "eager / compiled",
               "loop / compiled")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["architecture"], str(r["hidden"]), str(r["width"]), f"{r['compiled_ms']:.1f}",
                      f"{r['eager_ms']:.1f}", f"{r['loop_ms']:.1f}", f"{r['compiled_ms'] / r['width']:.3f}",
                      f"{r['eager_over_compiled']:.2f}x", f"{r['loop_over_compiled']:.2f}x")  # fmt: skip
    Console().print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.output
    out.write_text(json.dumps({"benchmark": "compiled_recurrent", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "threads": 1, "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
