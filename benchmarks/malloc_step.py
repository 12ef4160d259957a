"""What glibc's malloc settings do to a fused training step: milliseconds and page faults per step.

One fused step (forward, loss, backward, Adam) of 128 stacked MLPs on batches of 128 windows, in one
thread, repeated; each setting runs in its own process, since glibc reads its environment at start:
  - default: glibc as a plain Python process has it;
  - nanny: MALLOC_TRIM_THRESHOLD_=65536, as Dask's nanny starts every worker;
  - nanny + mmap threshold only: with MALLOC_MMAP_THRESHOLD_=33554432 as well (an earlier fix);
  - nanny + keep_freed_memory: the same, then tasks.allocator.keep_freed_memory() (what the workers'
    warm-up plugin calls).
Prints a table and writes benchmarks/results/malloc_step.json.
Run: `python -m benchmarks.malloc_step [--networks 128] [--steps 60]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results")
SETTINGS = {
    "default": ({}, False),
    "nanny": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, False),
    "nanny + mmap threshold only": ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "33554432"}, False),
    "nanny + keep_freed_memory": ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),
}


def measure(networks: int, steps: int, keep: bool) -> dict:
    """Milliseconds and minor page faults per fused step, after one warm-up round of `steps`."""
    import torch

    from models import ModelSpec, build_model
    from models.stacked import StackedAdam, stack
    from tasks.allocator import keep_freed_memory

    torch.set_num_threads(1)
    if keep:
        keep_freed_memory()
    spec = ModelSpec()
    stacked = stack("mlp", [build_model(spec, torch.Generator().manual_seed(k)) for k in range(networks)])
    optimizer = StackedAdam(stacked, lr=spec.learning_rate)
    rows = networks * 1500
    x, y = torch.randn(rows, spec.window), torch.randn(rows, spec.horizon)
    generator = torch.Generator().manual_seed(0)

    def run() -> tuple[float, float]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, rows, (networks * spec.batch_size,), generator=generator)
            prediction = stacked(x.index_select(0, idx).view(networks, spec.batch_size, -1))
            target = y.index_select(0, idx).view(networks, spec.batch_size, -1)
            optimizer.zero_grad()
            (prediction - target).pow(2).mean(dim=(1, 2)).sum().backward()
            optimizer.step(torch.ones(networks, dtype=torch.bool))
        seconds = time.perf_counter() - started
        return 1e3 * seconds / steps, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps

    run()
    ms, faults = run()
    return {"ms_per_step": ms, "page_faults_per_step": faults}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.networks, args.steps, SETTINGS[args.child][1])))
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    for name, (environment, _) in SETTINGS.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | environment
        out = subprocess.run([sys.executable, "-m", "benchmarks.malloc_step", "--child", name, "--networks",
                              str(args.networks), "--steps", str(args.steps)], env=env, check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        rows.append({"setting": name, **json.loads(out.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    view = Table(title=f"one fused step of {args.networks} MLPs (batch 128), 1 thread")
    for column in ("malloc setting", "ms per step", "page faults per step"):
        view.add_column(column, justify="right")
    for r in rows:
        view.add_row(r["setting"], f"{r['ms_per_step']:.1f}", f"{r['page_faults_per_step']:.0f}")
    Console(width=100).print(view)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "malloc_step.json").write_text(json.dumps(
        {"benchmark": "malloc_step", "networks": args.networks, "steps": args.steps,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {RESULTS / 'malloc_step.json'}")


if __name__ == "__main__":
    main()
