"""How to stack K networks: `torch.func.vmap` over the single module vs hand-written batched layers vs a loop.

One forward + backward of K same-shaped networks on one batch each (batch 128, window 32, 32 wide,
2 layers), in one thread; the best of three repeats. vmap is what `torch.func.stack_module_state`
offers for free; models/stacked.py writes each layer as a batched matrix product instead. This is
the measurement behind that choice, and behind how wide a fused recurrent task should be.
Prints a table and writes benchmarks/results/stacking_probe.json.
Run: `python -m benchmarks.stacking [--widths 4 16 64]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.func import functional_call, stack_module_state, vmap

from models import ModelSpec, build_model
from models.spec import ARCHITECTURES
from models.stacked import stack

RESULTS = Path(__file__).with_name("results")


def best_of(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(architecture: str, width: int, batch: int) -> dict:
    spec = ModelSpec(architecture=architecture)
    networks = [build_model(spec, torch.Generator().manual_seed(k)) for k in range(width)]
    x = torch.randn(width, batch, spec.window)

    def loop():
        for k, network in enumerate(networks):
            network(x[k]).pow(2).sum().backward()

    stacked = stack(architecture, networks)

    def handwritten():
        stacked(x).pow(2).sum().backward()

    params, buffers = stack_module_state(networks)
    base = copy.deepcopy(networks[0]).to("meta")

    def vmapped():
        out = vmap(lambda p, b, xs: functional_call(base, (p, b), (xs,)))(params, buffers, x)
        out.pow(2).sum().backward()

    row = {"architecture": architecture, "networks": width, "loop_s": best_of(loop),
           "stacked_s": best_of(handwritten)}  # fmt: skip
    try:
        row["vmap_s"] = best_of(vmapped)
    except RuntimeError as exc:  # no batching rule (e.g. aten::lstm): vmap cannot run it at all
        row["vmap_s"], row["vmap_error"] = None, str(exc).splitlines()[0][:120]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(a, w, args.batch) for a in ARCHITECTURES for w in args.widths]
    view = Table(title=f"forward+backward of K networks, batch {args.batch}, 1 thread (best of 3)")
    for column in ("arch", "K", "loop s", "stacked s", "vmap s", "loop / stacked", "loop / vmap"):
        view.add_column(column, justify="right")
    for r in rows:
        vmap_s = r["vmap_s"]
        view.add_row(r["architecture"], str(r["networks"]), f"{r['loop_s']:.3f}", f"{r['stacked_s']:.3f}",
                     "no batching rule" if vmap_s is None else f"{vmap_s:.3f}", f"{r['loop_s'] / r['stacked_s']:.2f}x",
                     "-" if vmap_s is None else f"{r['loop_s'] / vmap_s:.2f}x")  # fmt: skip
    Console(width=140).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stacking_probe.json").write_text(json.dumps(
        {"benchmark": "stacking_probe", "batch": args.batch, "threads": 1,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {RESULTS / 'stacking_probe.json'}")


if __name__ == "__main__":
    main()
